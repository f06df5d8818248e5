"""Reading and writing the safetensors format with our own code (no third-party package).

Layout of a file:
    8 bytes   little-endian u64 N: length of the JSON header
    N bytes   JSON object: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
                            ..., "__metadata__": {"str": "str"}}   (padded with spaces to 8)
    rest      the data buffer; offsets are relative to its start, tensors are row-major
              little-endian and must exactly tile [0, len(buffer)) without overlap.

The reader validates every header field before it touches data, the same checks the C++
loader makes, so a file this module accepts is one the runtime accepts too.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

# Upper bound on the JSON header (the reference implementation uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# dtype tag -> (bytes per element, torch dtype)
DTYPES: Dict[str, Tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
_TAG_OF_DTYPE = {dt: tag for tag, (_, dt) in DTYPES.items()}

# Tensors are written and read in native byte order, which the format fixes as little-endian.
assert sys.byteorder == "little", "safetensors_io supports little-endian hosts only"


class SafetensorsError(ValueError):
    """A malformed safetensors file or an unsupported tensor."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the same 2 bytes
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def save_file(tensors: Mapping[str, torch.Tensor], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` (name -> tensor) to `path`; names are stored sorted."""
    header: Dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("__metadata__ must map str to str")
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise SafetensorsError("'__metadata__' is reserved")
        t = tensors[name]
        if t.dtype not in _TAG_OF_DTYPE:
            raise SafetensorsError(f"{name}: unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        header[name] = {"dtype": _TAG_OF_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def parse_header(blob: bytes) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """Validate the header of a whole file held in `blob`.

    Returns (tensors: name -> {dtype, shape, data_offsets}, metadata, data_start).
    Raises SafetensorsError on anything malformed.
    """
    if len(blob) < 8:
        raise SafetensorsError("file shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(blob):
        raise SafetensorsError(f"header length {n} runs past the end of the file ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError("__metadata__ must map str to str")
    data_len = len(blob) - 8 - n
    ranges = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{name}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise SafetensorsError(f"{name}: shape must be a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise SafetensorsError(f"{name}: data_offsets must be [begin, end] with begin <= end")
        if offs[1] > data_len:
            raise SafetensorsError(f"{name}: data range {offs} runs past the end of the file")
        nbytes = DTYPES[dtype][0] * int(np.prod(shape, dtype=np.int64))
        if offs[1] - offs[0] != nbytes:
            raise SafetensorsError(
                f"{name}: shape {shape} x {dtype} needs {nbytes} bytes, range holds {offs[1] - offs[0]}")
        ranges.append((offs[0], offs[1], name))
    ranges.sort()
    pos = 0
    for b, e, name in ranges:
        if b < pos:
            raise SafetensorsError(f"{name}: data range overlaps the previous tensor")
        pos = e
    return header, metadata, 8 + n


def load_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read and validate `path`; returns (name -> tensor, metadata)."""
    with open(path, "rb") as f:
        blob = f.read()
    header, metadata, start = parse_header(blob)
    out: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        size, dtype = DTYPES[info["dtype"]]
        raw = bytearray(blob[start + b:start + e])  # writable copy: torch wants one
        if dtype == torch.bfloat16:
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16) if raw else \
                torch.empty(0, dtype=torch.bfloat16)
        else:
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out, metadata
