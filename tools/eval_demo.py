#!/usr/bin/env python3
"""Evaluate the lm2 demo model: answer accuracy per task family and per number of turns
between the last supporting fact and the question (1, 2, 4, 8), on held-out seeds.

    PYTHONPATH=tools python3 tools/eval_demo.py --model models/lm2-demo \
        [--vanilla DIR] [--n 200] [--seed 0] [--device cpu|cuda] [--json out.json]

Conditions (one turn = one memory segment; the self-attention context is emptied at
every turn in the first two, so only memory can carry a fact):
    memory    memory kept across turns
    cleared   every memory bank reset to its initial value before the question turn
    context   self-attention context kept across turns (attention can see the facts)
A question counts as correct when the whole reply and its <|end|> are the argmax at
every position (exactly what greedy decoding would say). "guess" is the best constant
answer per family and distance on the same episodes (the majority answer).
Episodes come from lm2data.episodes.eval_episode with random.Random(f"eval-{seed}-
{family}-{distance}"); training uses "train-..." and "check-..." streams.
Weights are used in float32. Tokenization: --words (a words.json) or the model's
tokenizer.model through sentencepiece.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm2data.encode import WordTable, encode_episode, make_batch  # noqa: E402
from lm2data.episodes import FAMILIES, eval_episode  # noqa: E402
from lm2data.runner import run_batch  # noqa: E402
from lm2ref.model_dir import load_model_dir  # noqa: E402

DISTANCES = [1, 2, 4, 8]


def episodes(seed, family, distance, n):
    rng = random.Random(f"eval-{seed}-{family}-{distance}")
    return [eval_episode(rng, family, distance) for _ in range(n)]


def evaluate(model, wt, seed, n, device, conditions, batch=256):
    """{condition: {(family, distance): accuracy}}, and the guess baseline."""
    res = {c: {} for c in conditions}
    guess = {}
    for fam in FAMILIES:
        for d in DISTANCES:
            eps = episodes(seed, fam, d, n)
            answers = collections.Counter(e[-1].reply for e in eps)
            guess[(fam, d)] = answers.most_common(1)[0][1] / n
            enc = [encode_episode(wt, e) for e in eps]
            for c in conditions:
                hits = 0
                for i in range(0, n, batch):
                    b = make_batch(enc[i:i + batch], device)
                    with torch.no_grad():
                        _, ok, hq = run_batch(model, b, context="keep" if c == "context" else "reset",
                                              clear_before_question=(c == "cleared"), want_loss=False)
                    assert int(hq.sum()) == len(enc[i:i + batch])
                    hits += int(ok.sum())
                res[c][(fam, d)] = hits / n
    return res, guess


def mean_over_families(table, d):
    return sum(table[(f, d)] for f in FAMILIES) / len(FAMILIES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vanilla", default="", help="model directory of the vanilla baseline")
    ap.add_argument("--words", default="", help="words.json (else the model's tokenizer.model)")
    ap.add_argument("--n", type=int, default=200, help="episodes per family and distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    wt = (WordTable.load(args.words) if args.words
          else WordTable.build(os.path.join(args.model, "tokenizer.model"), lines=20000, check=500))
    t0 = time.time()
    out = {"n_per_cell": args.n, "seed": args.seed, "distances": DISTANCES, "families": FAMILIES}
    model = load_model_dir(args.model, dtype=torch.float32).to(device)
    res, guess = evaluate(model, wt, args.seed, args.n, device, ["memory", "cleared", "context"])
    rows = [("LM2, memory kept", res["memory"]), ("LM2, memory cleared", res["cleared"]),
            ("LM2, context kept (attention sees the facts)", res["context"])]
    if args.vanilla:
        van = load_model_dir(args.vanilla, dtype=torch.float32).to(device)
        vres, _ = evaluate(van, wt, args.seed, args.n, device, ["memory", "context"])
        rows += [("vanilla, context reset", vres["memory"]),
                 ("vanilla, context kept", vres["context"])]
        out["vanilla"] = {c: {f"{f}@{d}": a for (f, d), a in t.items()} for c, t in vres.items()}
    rows.append(("guess (majority answer)", guess))
    out["lm2"] = {c: {f"{f}@{d}": a for (f, d), a in t.items()} for c, t in res.items()}
    out["guess"] = {f"{f}@{d}": a for (f, d), a in guess.items()}

    lines = [f"Answer accuracy, mean over the {len(FAMILIES)} families, {args.n} episodes per "
             f"family and distance (seed {args.seed}):", "",
             "| model, condition | " + " | ".join(f"{d} turn{'s' if d > 1 else ''}" for d in DISTANCES) + " |",
             "|---|" + "---|" * len(DISTANCES)]
    for name, t in rows:
        lines.append(f"| {name} | " + " | ".join(f"{mean_over_families(t, d):.3f}" for d in DISTANCES) + " |")
    lines += ["", "Per family (LM2, memory kept / memory cleared / guess):", "",
              "| family | " + " | ".join(f"{d} turn{'s' if d > 1 else ''}" for d in DISTANCES) + " |",
              "|---|" + "---|" * len(DISTANCES)]
    for f in FAMILIES:
        lines.append(f"| {f} | " + " | ".join(
            f"{res['memory'][(f, d)]:.2f} / {res['cleared'][(f, d)]:.2f} / {guess[(f, d)]:.2f}"
            for d in DISTANCES) + " |")
    lines.append("")
    lines.append(f"({time.time() - t0:.0f}s on {device})")
    text = "\n".join(lines)
    print(text)
    out["table"] = text
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
