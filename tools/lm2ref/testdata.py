"""Random test models and the golden files every backend is tested against.

    /usr/bin/python3 -m lm2ref.testdata --out tests/data      (PYTHONPATH=tools)
or simply tools/regen-test-data. Writes:

    tests/data/models/<name>/    config.json, model.safetensors (F32), tokenizer.model,
                                 chat_template.json
    tests/data/golden/<name>/<case>.safetensors

A golden file holds, for one fixed token sequence split into segments:
    tokens            I64 [T]           all tokens, segments back to back
    segment_lengths   I64 [K]           (a 0 is an empty segment: memory must not change)
    logits            F64 [T, V]        float64 logits at every position
    memory.<k>.<l>    F64 [N, d]        the bank of memory layer l after segment k
and metadata {"format": "lm2-golden-1", "model": name, "case": case, "context": "keep" |
"reset"}: "keep" runs the self-attention context across segments, "reset" starts each
segment with an empty KV cache at position 0.

Everything is deterministic: weights come from numpy's legacy RandomState (a stable
stream), tokens from a fixed LCG, the tokenizer from a fixed corpus, so regenerating gives
the committed files (tests/python/test_golden.py checks that).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch

from . import safetensors_io as st
from . import tokenizer as tok
from .config import LM2Config
from .model import LM2ForCausalLM, identity_memory
from .model_dir import expected_tensors, load_model_dir, save_model_dir

VOCAB = 512
GOLDEN_FORMAT = "lm2-golden-1"

# The CI test models: small, but each exercises a different path of the contract.
TEST_MODELS: Dict[str, dict] = {
    # Memory in every layer, grouped-query attention (4 query heads over 2 KV heads).
    "tiny-lm2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, memory_slots=16,
                     memory_heads=4, memory_segment_tokens=16),
    # A plain Llama: no memory keys, tied embeddings, multi-query attention.
    "tiny-vanilla": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    # Memory in one layer only, with a learned init tensor; more slots than a head has dims.
    "tiny-partial": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, memory_slots=12,
                         memory_heads=2, memory_layers=[1], memory_learned_init=True),
}

# Golden cases: (name, segment lengths, context mode).
GOLDEN_CASES: List[Tuple[str, List[int], str]] = [
    ("keep3", [9, 6, 11], "keep"),
    ("reset3", [7, 12, 5], "reset"),
    ("empty-segment", [8, 0, 6, 4], "keep"),
]


def model_config(name: str) -> LM2Config:
    return LM2Config(vocab_size=VOCAB, max_position_embeddings=256, rope_theta=10000.0,
                     rms_norm_eps=1e-5, **TEST_MODELS[name])


def random_weights(cfg: LM2Config, seed: int) -> Dict[str, torch.Tensor]:
    """Weights with O(1) activations so every part of the model visibly moves the logits:
    linear maps N(0, 1/fan_in), embeddings N(0, 1), norm gains 1 + N(0, 0.1^2), gate biases
    N(0, 0.5^2) except the forget gate's, near 2 (memory kept, as training starts)."""
    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in expected_tensors(cfg):
        z = rng.standard_normal(shape)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = 1.0 + 0.1 * z
        elif name.endswith("embed_tokens.weight"):
            w = z
        elif name.endswith("forget_gate.bias"):
            w = 2.0 + 0.5 * z
        elif name.endswith(".bias"):
            w = 0.5 * z
        elif name.endswith("memory.init"):
            w = identity_memory(*shape).numpy() + 0.1 * z
        else:
            w = z / np.sqrt(shape[1])
        out[name] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out


def golden_tokens(n: int, seed: int, vocab: int = VOCAB) -> List[int]:
    """n token ids in [4, vocab) from a fixed 64-bit LCG (ids 0-3 are control pieces)."""
    x, out = seed, []
    for _ in range(n):
        x = (6364136223846793005 * x + 1442695040888963407) % (1 << 64)
        out.append(4 + (x >> 33) % (vocab - 4))
    return out


def compute_golden(model: LM2ForCausalLM, lengths: List[int], context: str, seed: int):
    """Run one golden case in the model's dtype; returns the tensors of the golden file."""
    tokens = golden_tokens(sum(lengths), seed, model.config.vocab_size)
    ids = torch.tensor(tokens, dtype=torch.long)[None]
    segments = list(ids.split(lengths, dim=1))
    with torch.no_grad():
        logits, banks, _ = model.run_segments(segments, context=context)
    out = {"tokens": ids[0].clone(), "segment_lengths": torch.tensor(lengths, dtype=torch.long),
           "logits": torch.cat(logits, dim=1)[0].to(torch.float64)}
    for k, layer_banks in enumerate(banks):
        for layer, bank in enumerate(layer_banks):
            if bank is not None:
                out[f"memory.{k}.{layer}"] = bank[0].to(torch.float64).clone()
    return out


def write_models(out_dir: str, tokenizer_path: str) -> None:
    for i, name in enumerate(sorted(TEST_MODELS)):
        cfg = model_config(name)
        model = LM2ForCausalLM(cfg)
        model.load_state_dict(random_weights(cfg, seed=1000 + i), strict=True)
        save_model_dir(model, os.path.join(out_dir, "models", name), dtype=torch.float32,
                       tokenizer=tokenizer_path,
                       extra_files={"chat_template.json": tok.chat_template_json()})


def write_goldens(out_dir: str) -> None:
    for name in sorted(TEST_MODELS):
        model = load_model_dir(os.path.join(out_dir, "models", name), dtype=torch.float64)
        gdir = os.path.join(out_dir, "golden", name)
        os.makedirs(gdir, exist_ok=True)
        for j, (case, lengths, context) in enumerate(GOLDEN_CASES):
            tensors = compute_golden(model, lengths, context, seed=77 + j)
            st.save_file(tensors, os.path.join(gdir, case + ".safetensors"),
                         {"format": GOLDEN_FORMAT, "model": name, "case": case,
                          "context": context})
            print(f"  golden/{name}/{case}: {int(tensors['tokens'].numel())} tokens, "
                  f"{len(lengths)} segments, context {context}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/data", help="output directory (default tests/data)")
    ap.add_argument("--goldens-only", action="store_true",
                    help="recompute golden files from the models already in --out")
    args = ap.parse_args(argv)
    if not args.goldens_only:
        with tempfile.TemporaryDirectory() as tmp:
            tpath = os.path.join(tmp, "tokenizer.model")
            print(f"training tokenizer ({VOCAB} pieces) with spm_train")
            tok.train_tokenizer(tok.generate_corpus(), tpath, vocab_size=VOCAB)
            print(f"writing test models to {args.out}/models")
            write_models(args.out, tpath)
    print(f"computing float64 golden files in {args.out}/golden")
    write_goldens(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
