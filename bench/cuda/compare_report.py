"""The table bench/cuda/compare_builds prints: each figure of lm2_cuda_bench's JSON per run of
builds A and B (runs A1, B1, A2, B2, ... in OUT_DIR), and B's best over A's best.

    compare_report.py OUT_DIR ROUNDS

Rates (tokens/s) are better higher, times (ms) lower; "best" is the highest rate or the
lowest time over a build's runs, and the ratio is B / A for rates, A / B for times, so that
a ratio above 1 always means B is faster. Runs missing a figure show "-".
"""
import json
import os
import sys


def figures(run):
    """(name, value, kind) of one run's JSON: kind "rate" (higher is better) or "ms"."""
    out = [("decode batch 1 (tokens/s)", run.get("decode_tps"), "rate"),
           ("decode, logits to the host (tokens/s)", run.get("decode_host_argmax_tps"), "rate"),
           ("decode sampled on the device (tokens/s)", run.get("decode_sampled_tps"), "rate")]
    for n, p in sorted(run.get("prefill", {}).items(), key=lambda kv: int(kv[0])):
        tokens = int(n)
        out.append((f"prefill {n} (tokens/s)", p.get("tps"), "rate"))
        if "reused_s" in p:
            out.append((f"prefill {n}, reused state (tokens/s)", tokens / p["reused_s"], "rate"))
        if "new_state_s" in p:
            out.append((f"new state before prefill {n} (ms)", 1e3 * p["new_state_s"], "ms"))
    late = run.get("late_prompt")
    if late:
        out.append((f"a {late['tokens']}-token prompt after {late['context']} tokens (ms)", 1e3 * late["s"], "ms"))
    fresh = run.get("new_lengths")
    if fresh:
        out.append(("prompts of new lengths, first time (ms)", 1e3 * fresh["first_s"], "ms"))
        out.append(("the same prompts again (ms)", 1e3 * fresh["again_s"], "ms"))
    for b, s in sorted(run.get("sessions", {}).items(), key=lambda kv: int(kv[0])):
        out.append((f"{b} sessions (tokens/s)", s.get("tps"), "rate"))
    for key, name in (("first_turn_s", "first turn after the load (ms)"),
                      ("second_turn_s", "a new session's first turn (ms)"),
                      ("next_turn_s", "that session's next turn (ms)"), ("end_segment_s", "end of segment (ms)"),
                      ("export_s", "bank export into a kept bank (ms)"),
                      ("export_fresh_s", "bank export into a new bank (ms)"), ("import_s", "bank import (ms)")):
        if key in run:
            out.append((name, 1e3 * run[key], "ms"))
    return [f for f in out if f[1] is not None]


def main():
    out_dir, rounds = sys.argv[1], int(sys.argv[2])
    runs = {}
    for r in range(1, rounds + 1):
        for build in "AB":
            path = os.path.join(out_dir, f"{build}{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs[f"{build}{r}"] = json.load(f)
    if not runs:
        sys.exit(f"compare_report: no runs in {out_dir}")
    names = [f"{b}{r}" for r in range(1, rounds + 1) for b in "AB"]
    table, kinds, order = {}, {}, []
    for run_name, run in runs.items():
        for name, value, kind in figures(run):
            if name not in table:
                order.append(name)
            table.setdefault(name, {})[run_name] = value
            kinds[name] = kind
    device = next(iter(runs.values())).get("device", "?")
    print(f"device: {device}; runs in rounds A B, B A, A B, ... (A and B as named by compare_builds)\n")
    print("| figure | " + " | ".join(names) + " | B / A (best) |")
    print("| --- |" + " --- |" * (len(names) + 1))
    for name in order:
        row = table[name]
        fmt = "{:.1f}" if kinds[name] == "rate" else "{:.2f}"
        cells = [fmt.format(row[n]) if n in row else "-" for n in names]
        pick = max if kinds[name] == "rate" else min
        a = [row[n] for n in names if n.startswith("A") and n in row]
        b = [row[n] for n in names if n.startswith("B") and n in row]
        ratio = "-"
        if a and b:
            best_a, best_b = pick(a), pick(b)
            ratio = f"{best_b / best_a:.3f}" if kinds[name] == "rate" else f"{best_a / best_b:.3f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
