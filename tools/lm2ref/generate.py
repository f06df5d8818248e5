"""Generate text with the reference model from a model directory.

    PYTHONPATH=tools /usr/bin/python3 -m lm2ref.generate --model DIR --prompt "..." [--prompt ...]

Each --prompt is one memory segment: the prompt and its reply are processed, then the
memory write is applied before the next prompt. With --reset-context the next prompt
starts with an empty self-attention context, so only the memory bank carries anything
over. Prints per-layer memory slot norms after each turn with --show-memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .model_dir import load_model_dir
from .tokenizer import load_processor


def sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--prompt", action="append", required=True, help="one turn (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--reset-context", action="store_true",
                    help="empty self-attention context at every turn (memory only)")
    ap.add_argument("--show-memory", action="store_true", help="print slot norms per turn")
    args = ap.parse_args(argv)

    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = load_model_dir(args.model, dtype=getattr(torch, args.dtype))
    sp = load_processor(f"{args.model}/tokenizer.model")
    cfg = model.config
    print(f"loaded in {time.time() - t0:.2f}s: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"memory layers {cfg.memory_layers or 'none'}, {cfg.memory_slots} slots",
          file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    state = model.initial_state()
    with torch.no_grad():
        for turn, prompt in enumerate(args.prompt, 1):
            if args.reset_context:
                model.reset_context(state)
            ids = sp.EncodeAsIds(prompt)
            if turn == 1:
                ids = [cfg.bos_token_id] + ids
            print(f"[turn {turn}] {prompt}\n  -> ", end="", flush=True)
            logits = model.forward_tokens(state, torch.tensor([ids]))[0, -1]
            out = []
            for _ in range(args.max_tokens):
                nxt = sample(logits, args.temperature, args.top_k, gen)
                if nxt == cfg.eos_token_id:
                    break
                out.append(nxt)
                print(sp.DecodeIds(out[-1:]) if len(out) == 1 else
                      sp.DecodeIds(out)[len(sp.DecodeIds(out[:-1])):], end="", flush=True)
                logits = model.forward_tokens(state, torch.tensor([[nxt]]))[0, -1]
            print()
            model.end_segment(state)  # prompt + reply form one memory segment
            if args.show_memory:
                for i, bank in enumerate(state.memory()):
                    if bank is not None:
                        norms = bank[0].norm(dim=-1)
                        print(f"  memory layer {i}: slot norm mean {float(norms.mean()):.3f} "
                              f"max {float(norms.max()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
