#!/usr/bin/python3
"""How much one wrong KV row moves the demo model's logits, on the token sequence of the CUDA
model test "Prompts after decode steps attend over every cached row" (prompts of 100, 300 and
50 tokens, each of the first two followed by 5 greedy steps). That test compares the logits
at each prompt's end with one prefill of the same tokens; this script gives what a bug it is
meant to catch would do there, to set its bounds against: a decode-appended row holding
another token's K/V ("stale") or left out ("missing"), in the float32 reference.

    /usr/bin/python3 tools/analysis/row_effect.py [MODEL_DIR]     (default: models/lm2-demo)

Prints, per wrong row, the logits' relative error (||a - b|| / ||b||, the tests' measure) at
each later prompt end. Runs on the CPU in a few seconds.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lm2ref.model_dir import load_model_dir  # noqa: E402


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/lm2-demo"
    torch.set_num_threads(2)
    model = load_model_dir(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    def logits_of(seq):
        state = model.initial_state(1)
        with torch.no_grad():
            return model.forward_tokens(state, torch.tensor([seq]))[0].double()

    # The test's tokens: prompt token i of a prompt starting at s is (s + i) * 37 mod V; the
    # greedy steps' tokens are this reference's picks (the GPU's may differ after a near tie).
    seq = []
    ends = []
    for length, steps in ((100, 5), (300, 5), (50, 0)):
        seq += [((len(seq) + i) * 37) % vocab for i in range(length)]
        ends.append(len(seq))
        for _ in range(steps):
            seq.append(int(logits_of(seq)[-1].argmax()))
    ref = logits_of(seq)
    print(f"{model_dir}: {len(seq)} tokens, prompt ends {ends}")
    for row in (ends[0] + 2, ends[1] + 2):  # a step's row after the first and after the second prompt
        stale = seq[:row] + [(seq[row] + 1) % vocab] + seq[row + 1:]
        missing = seq[:row] + seq[row + 1:]
        # (kind, the wrong sequence, how many positions earlier each prompt end sits in it)
        for kind, wrong, shift in (("stale (another token)", stale, 0), ("missing", missing, 1)):
            out = logits_of(wrong)
            errs = [float((out[e - 1 - shift] - ref[e - 1]).norm() / ref[e - 1].norm())
                    for e in ends if e - 1 > row]
            print(f"  row {row} {kind}: logits rel err at the later prompt ends "
                  + ", ".join(f"{x:.3g}" for x in errs))


if __name__ == "__main__":
    main()
