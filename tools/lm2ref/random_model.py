"""Write a random-weight model directory of a named size (benchmarks, smoke tests).

    PYTHONPATH=tools /usr/bin/python3 -m lm2ref.random_model --preset mid --out /tmp/lm2-mid

Weights follow lm2ref.testdata.random_weights (O(1) activations); no tokenizer is written.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import LM2Config
from .model import LM2ForCausalLM
from .model_dir import save_model_dir
from .testdata import random_weights

PRESETS = {
    # ~1 M parameters: the CI test model's shape.
    "small": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, memory_slots=16, memory_heads=4),
    # ~96 M parameters, memory in every layer.
    "mid": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=12, num_key_value_heads=4, memory_slots=256, memory_heads=12),
    # The paper's configuration (~1.7 B parameters; 6.8 GB as fp32).
    "paper": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, memory_slots=2048, memory_heads=32,
                  tie_word_embeddings=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--max-positions", type=int, default=4096)
    args = ap.parse_args(argv)
    cfg = LM2Config(max_position_embeddings=args.max_positions, **PRESETS[args.preset])
    weights = random_weights(cfg, args.seed)
    n = sum(t.numel() for t in weights.values())
    print(f"{args.preset}: {n / 1e6:.1f} M parameters -> {args.out}", file=sys.stderr)
    model = LM2ForCausalLM(cfg)
    model.load_state_dict(weights, strict=True)
    save_model_dir(model, args.out, dtype=getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
