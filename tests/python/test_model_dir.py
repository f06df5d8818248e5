"""The model directory format: safetensors written by our own code, read back exactly,
and malformed files refused with a clear error."""

import json
import os
import struct

import pytest
import torch

from lm2ref import safetensors_io as st
from lm2ref.model import LM2ForCausalLM
from lm2ref.model_dir import ModelDirError, load_model_dir, read_tensors, save_model_dir
from lm2ref.testdata import model_config, random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(ROOT, "tests", "data", "models")


def fresh_model(name):
    cfg = model_config(name)
    model = LM2ForCausalLM(cfg)
    model.load_state_dict(random_weights(cfg, 3), strict=True)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shard", [0, 64 * 1024])
def test_saved_model_loads_identical_tensors(tmp_path, dtype, shard):
    model = fresh_model("tiny-partial")
    save_model_dir(model, str(tmp_path), dtype=dtype, max_shard_bytes=shard)
    files = sorted(os.listdir(tmp_path))
    if shard:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
        for f in files:
            if f.endswith(".safetensors"):
                assert os.path.getsize(tmp_path / f) <= shard + 64 * 1024  # one tensor may exceed
    stored = read_tensors(str(tmp_path))
    for name, t in model.state_dict().items():
        assert stored[name].dtype == dtype
        assert torch.equal(stored[name], t.to(dtype)), name
    loaded = load_model_dir(str(tmp_path), dtype=torch.float32)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].to(dtype).float()), name


def test_round_trip_every_dtype_and_metadata(tmp_path):
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64),
        "i64": torch.arange(7, dtype=torch.int64),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    path = str(tmp_path / "x.safetensors")
    st.save_file(tensors, path, {"k": "v"})
    back, meta = st.load_file(path)
    assert meta == {"k": "v"}
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    # The header is padded so the data buffer starts 8-byte aligned.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert n % 8 == 0


def write_raw(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


def entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


@pytest.mark.parametrize("case", [
    "truncated_length", "header_beyond_file", "huge_header", "invalid_json", "not_object",
    "unknown_dtype", "shape_size_mismatch", "range_beyond_file", "overlap", "negative_shape",
    "bad_offsets", "extra_key",
])
def test_malformed_safetensors_are_refused(tmp_path, case):
    p = str(tmp_path / "bad.safetensors")
    data = bytes(16)
    if case == "truncated_length":
        open(p, "wb").write(b"\x10\x00\x00")
    elif case == "header_beyond_file":
        write_raw(p, {"a": entry()}, data, header_len=10_000)
    elif case == "huge_header":
        write_raw(p, {"a": entry()}, data, header_len=1 << 62)
    elif case == "invalid_json":
        write_raw(p, b'{"a": {"dtype": ', data)
    elif case == "not_object":
        write_raw(p, b"[1, 2, 3]", data)
    elif case == "unknown_dtype":
        write_raw(p, {"a": entry(dtype="F8_E9M9")}, data)
    elif case == "shape_size_mismatch":
        write_raw(p, {"a": entry(shape=(3,))}, data)
    elif case == "range_beyond_file":
        write_raw(p, {"a": entry(shape=(8,), offs=(0, 32))}, data)
    elif case == "overlap":
        write_raw(p, {"a": entry(offs=(0, 8)), "b": entry(offs=(4, 12))}, data)
    elif case == "negative_shape":
        write_raw(p, {"a": entry(shape=(-2,))}, data)
    elif case == "bad_offsets":
        write_raw(p, {"a": entry(offs=(8, 0))}, data)
    elif case == "extra_key":
        write_raw(p, {"a": {**entry(), "extra": 1}}, data)
    with pytest.raises(st.SafetensorsError):
        st.load_file(p)


def test_model_dir_with_wrong_tensors_is_refused(tmp_path):
    model = fresh_model("tiny-lm2")
    tensors = dict(model.state_dict())
    save_model_dir(model, str(tmp_path))
    cases = {
        "missing": {k: v for k, v in tensors.items() if "read_q" not in k},
        "unexpected": {**tensors, "model.layers.0.memory.bogus": torch.zeros(2)},
        "wrong_shape": {**tensors, "model.norm.weight": torch.zeros(65)},
    }
    for what, ts in cases.items():
        st.save_file(ts, str(tmp_path / "model.safetensors"))
        with pytest.raises(ModelDirError):
            load_model_dir(str(tmp_path))


def test_committed_test_models_load():
    for name in ("tiny-lm2", "tiny-partial", "tiny-vanilla"):
        model = load_model_dir(os.path.join(MODELS, name))
        assert model.config == model_config(name)
        assert os.path.exists(os.path.join(MODELS, name, "tokenizer.model"))
