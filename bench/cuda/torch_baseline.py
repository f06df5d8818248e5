#!/usr/bin/env python3
"""The PyTorch baseline of the CUDA benchmark (issue 7, "Benchmarks"): the project's own
reference model (tools/lm2ref, eager PyTorch, no compile, no custom kernels) timed on the
workloads of the C++ CUDA benchmark, in the same device run, so the two can be compared.

    python3 bench/cuda/torch_baseline.py --model DIR [--device cuda] [--dtype bfloat16] \
        [--decode-tokens 128] [--prefill 512,4096] [--sessions 8,32,64] [--warmup N] \
        [--repeats R] [--prompt-tokens P] [--json OUT.json]

DIR is a model directory (e.g. `PYTHONPATH=tools python3 -m lm2ref.random_model --preset
paper --dtype bfloat16 --out /tmp/lm2-paper`, issue 7's configuration). The model is loaded
with lm2ref.model_dir.load_model_dir(dtype=...) and moved to the device; everything runs
under torch.inference_mode(). Every figure is taken after warm-up (--warmup untimed runs
of the same work), timed by wall clock between torch.cuda.synchronize() calls. On CPU
(`--device cpu --dtype float32`) it runs too, which is how tests/python tests it.

Figures (one printed line each; --json writes them all, with the device name, torch
version, dtype and model config, for the C++ bench's report), and issue 7's list:

  decode_batch1   batch-1 decode tokens/s. One session: a segment is opened by a prompt
                  of --prompt-tokens (32) tokens, then --decode-tokens single-token
                  forward_tokens calls are timed, greedy (next token = argmax of the
                  logits, copied to the host each step as a real decode loop does to
                  check for EOS; that sync is part of the cost). Issue 7: "batch-1 decode
                  tokens/s" -- the baseline the ">= 5x the PyTorch baseline" target is
                  measured against (the roofline ratio is the C++ bench's).
  prefill         prefill tokens/s for each --prefill length: a fresh state, one
                  forward_tokens call of that many tokens (which opens the segment, so it
                  includes computing the memory K/V of the bank, and returns logits for
                  every position, as lm2ref does). Median of --repeats runs. A length
                  above max_position_embeddings is skipped with a note. Issue 7: "prefill
                  tokens/s for 512 and 4096 tokens" (the GEMM-rate ratio is the C++
                  bench's).
  sessions        decode throughput with B concurrent sessions for each --sessions B:
                  lm2ref's batch dimension (state = initial_state(B), input_ids [B, 1]),
                  a [B, prompt] prompt, then --decode-tokens greedy steps;
                  tokens/s = B * steps / time. A B that does not fit in device memory is
                  reported as an error (CUDA out-of-memory) and the rest still run. Also
                  the end_segment time of the B sessions. Issue 7: "decode throughput with
                  8, 32 and 64 concurrent sessions".
  end_segment     the memory write (eq. 4-6, model.end_segment) of one session after the
                  batch-1 decode, since every chat turn ends with one. Median of
                  --repeats writes (the later ones after one more token each). Issue 7 has
                  no line for it; it is the GPU cost at the end of a turn, before the
                  bank export (whose device <-> pinned host time the C++ bench measures).

Not here: the bandwidth and GEMM rooflines and the memory-bank export/import time, which
the C++ bench measures itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

from lm2ref.model_dir import load_model_dir  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32, "float64": torch.float64}

# torch.cuda.OutOfMemoryError exists from torch 1.13; older versions raise RuntimeError.
_OOM = getattr(torch.cuda, "OutOfMemoryError", None)


def is_oom(e: BaseException) -> bool:
    if _OOM is not None and isinstance(e, _OOM):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e)


def oom_message(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return "out of memory: " + (first[0] if first else type(e).__name__)


def int_list(text: str) -> List[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return out


class Bench:
    def __init__(self, model, device: torch.device, seed: int):
        self.model = model
        self.device = device
        self.cfg = model.config
        self.gen = torch.Generator().manual_seed(seed)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def tokens(self, batch: int, n: int) -> torch.Tensor:
        ids = torch.randint(0, self.cfg.vocab_size, (batch, n), generator=self.gen)
        return ids.to(self.device)

    def greedy_steps(self, state, tok: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` single-token forward calls, each fed the argmax of the previous one's
        logits; every step copies the tokens to the host (the EOS check of a real loop)."""
        for _ in range(steps):
            logits = self.model.forward_tokens(state, tok)     # [B, 1, V]
            tok = logits[:, -1].argmax(dim=-1, keepdim=True)   # [B, 1]
            tok.cpu()                                          # host sees the token: sync
        return tok

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- figures ------------------------------------------------------------------------
    def decode(self, batch: int, prompt: int, steps: int, warmup: int, repeats: int) -> dict:
        """Greedy decode of `batch` sessions after a prompt, then end_segment. A warm-up
        segment (prompt, `warmup` steps, end_segment) comes first, untimed; the timed
        segment continues the same context, as a chat's next turn does."""
        m = self.model
        state = m.initial_state(batch)
        tok = m.forward_tokens(state, self.tokens(batch, prompt))[:, -1].argmax(-1, keepdim=True)
        tok = self.greedy_steps(state, tok, warmup)
        m.end_segment(state)
        self.sync()
        # The measured turn: prompt (untimed), then the decode loop, then the write.
        tok = m.forward_tokens(state, self.tokens(batch, prompt))[:, -1].argmax(-1, keepdim=True)
        tok.cpu()
        secs = self.timed(lambda: self.greedy_steps(state, tok, steps))
        writes = [self.timed(lambda: m.end_segment(state))]
        for _ in range(repeats - 1):  # more writes, each after one more token
            m.forward_tokens(state, tok)
            writes.append(self.timed(lambda: m.end_segment(state)))
        return {"batch": batch, "prompt_tokens": prompt, "steps": steps,
                "tokens": batch * steps, "seconds": secs,
                "tokens_per_s": batch * steps / secs, "ms_per_step": 1e3 * secs / steps,
                "end_segment_ms": 1e3 * statistics.median(writes),
                "end_segment_samples_ms": [1e3 * w for w in writes]}

    def prefill(self, n: int, warmup: int, repeats: int) -> dict:
        m = self.model
        ids = self.tokens(1, n)

        def once():
            state = m.initial_state(1)
            logits = m.forward_tokens(state, ids)
            del logits, state

        for _ in range(warmup):
            once()
        samples = [self.timed(once) for _ in range(repeats)]
        secs = statistics.median(samples)
        return {"tokens": n, "seconds": secs, "tokens_per_s": n / secs, "samples_s": samples}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def model_shape(cfg, params: int) -> str:
    mem = (f"memory {cfg.memory_slots} slots x {cfg.memory_heads} heads in "
           f"{len(cfg.memory_layers)}/{cfg.num_hidden_layers} layers"
           if cfg.has_memory else "no memory")
    return (f"{cfg.num_hidden_layers} layers, d={cfg.hidden_size}, ffn={cfg.intermediate_size}, "
            f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv "
            f"(head_dim {cfg.head_dim}), vocab {cfg.vocab_size}, {mem}, "
            f"max positions {cfg.max_position_embeddings}, {params / 1e6:.1f} M parameters")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--decode-tokens", type=int, default=128,
                    help="timed decode steps (batch 1 and each session count)")
    ap.add_argument("--prefill", type=int_list, default=[512, 4096],
                    help="comma-separated prefill lengths (default 512,4096)")
    ap.add_argument("--sessions", type=int_list, default=[8, 32, 64],
                    help="comma-separated concurrent session counts (default 8,32,64)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before each figure")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each prefill length and of end_segment (median)")
    ap.add_argument("--prompt-tokens", type=int, default=32,
                    help="prompt before the decode figures (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    if args.decode_tokens <= 0 or args.prompt_tokens <= 0 or args.repeats <= 0 or args.warmup < 0:
        ap.error("--decode-tokens, --prompt-tokens and --repeats must be > 0, --warmup >= 0")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch_baseline: CUDA is not available (use --device cpu --dtype float32)",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model = load_model_dir(args.model, dtype=dtype).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())

    result = {
        "tool": "bench/cuda/torch_baseline.py",
        "implementation": "lm2ref (PyTorch eager)",
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "dtype": args.dtype,
        "model_dir": os.path.abspath(args.model),
        "config": cfg.to_dict(),
        "parameters": params,
        "load_s": load_s,
        "settings": {"decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens,
                     "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"device: {result['device']} ({args.device}), torch {torch.__version__}"
          f"{', CUDA ' + torch.version.cuda if torch.version.cuda else ''}, dtype {args.dtype}")
    print(f"model: {args.model}: {model_shape(cfg, params)}")
    print(f"load: {load_s:.1f} s")

    # Positions one decode run uses: two prompts, the warm-up steps, the timed steps and the
    # tokens between repeated writes.
    need = 2 * args.prompt_tokens + args.warmup + args.decode_tokens + args.repeats
    if need > cfg.max_position_embeddings:
        print(f"torch_baseline: a decode run needs {need} positions, more than "
              f"max_position_embeddings={cfg.max_position_embeddings}; lower --decode-tokens "
              f"or --prompt-tokens", file=sys.stderr)
        return 2

    bench = Bench(model, device, args.seed)
    with torch.inference_mode():
        # 1 + 4: batch-1 decode and the end-of-turn memory write.
        r = bench.decode(1, args.prompt_tokens, args.decode_tokens, args.warmup, args.repeats)
        result["decode_batch1"] = {k: r[k] for k in ("prompt_tokens", "tokens", "seconds",
                                                     "tokens_per_s", "ms_per_step")}
        result["end_segment"] = {"batch": 1, "ms": r["end_segment_ms"],
                                 "samples_ms": r["end_segment_samples_ms"]}
        print(f"decode batch 1: {r['tokens_per_s']:.1f} tok/s ({r['tokens']} tokens after a "
              f"{r['prompt_tokens']}-token prompt in {r['seconds']:.3f} s, "
              f"{r['ms_per_step']:.2f} ms/token)")
        print(f"end_segment batch 1: {r['end_segment_ms']:.2f} ms (median of {args.repeats})")
        bench.free()

        # 2: prefill.
        result["prefill"] = []
        for n in args.prefill:
            if n > cfg.max_position_embeddings:
                note = f"longer than max_position_embeddings={cfg.max_position_embeddings}"
                print(f"prefill {n}: skipped ({note})")
                result["prefill"].append({"tokens": n, "skipped": note})
                continue
            p, msg = None, None
            try:
                p = bench.prefill(n, args.warmup, args.repeats)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is reported
                if not is_oom(e):
                    raise
                msg = oom_message(e)
            if p is None:  # out of the except block, so the traceback's tensors are freed
                bench.free()
                print(f"prefill {n}: {msg}")
                result["prefill"].append({"tokens": n, "error": msg})
                continue
            result["prefill"].append(p)
            print(f"prefill {n}: {p['tokens_per_s']:.0f} tok/s ({p['seconds'] * 1e3:.1f} ms, "
                  f"median of {args.repeats})")
            bench.free()

        # 3: concurrent sessions.
        result["sessions"] = []
        for b in args.sessions:
            r, msg = None, None
            try:
                r = bench.decode(b, args.prompt_tokens, args.decode_tokens, args.warmup,
                                 args.repeats)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is reported
                if not is_oom(e):
                    raise
                msg = oom_message(e)
            if r is None:
                bench.free()
                print(f"decode {b} sessions: {msg}")
                result["sessions"].append({"sessions": b, "error": msg})
                continue
            entry = {"sessions": b, "steps": r["steps"], "tokens": r["tokens"],
                     "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"],
                     "ms_per_step": r["ms_per_step"], "end_segment_ms": r["end_segment_ms"]}
            result["sessions"].append(entry)
            print(f"decode {b} sessions: {r['tokens_per_s']:.1f} tok/s ({b} x {r['steps']} "
                  f"tokens in {r['seconds']:.3f} s, {r['ms_per_step']:.2f} ms/step; "
                  f"end_segment {r['end_segment_ms']:.2f} ms)")
            bench.free()

    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
