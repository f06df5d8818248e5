#!/usr/bin/env python3
"""Where a traced run's GPU time went: reads the CSV of liblm2_kernel_trace.so
(bench/cuda/kernel_trace.cc) and prints, for the GPU work it holds (kernels, copies, sets):

- the traced call's own span (cudaProfilerStart to Stop, the "window" row) and how long the
  host took before the GPU's first work and after its last;
- the span from the first start to the last end, how much of it some work ran (the union),
  the idle rest, and the sum of the works' own times (sum / union: how much they overlapped);
- each stream's share;
- the idle gaps, largest first, with the work on either side, and whether the host was
  late: the call that launched the next work returned after the GPU had gone idle;
- the works by name (count, total, mean);
- the host's API calls by name (count, total), and how far ahead of the GPU the host ran
  (a work's start minus the return of the call that launched it).

    trace_summary.py TRACE.csv [--gaps N] [--min-gap-us X]

Standard library only (the GPU machine's python3 will do); c++filt names the kernels where
it is installed.
"""
import argparse
import csv
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict


def demangle(names):
    names = sorted(set(names))
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name, width=70):
    """A demangled name without its namespaces, argument list and template arguments' bulk."""
    base = name
    for prefix in ("(anonymous namespace)::", "lm2::runtime::cuda::", "tiled::", "void "):
        base = base.replace(prefix, "")
    base = base.split("(")[0]
    return base if len(base) <= width else base[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--gaps", type=int, default=15, help="gaps to list (default 15)")
    ap.add_argument("--min-gap-us", type=float, default=0.0, help="gaps shorter than this are not listed")
    args = ap.parse_args()

    works, apis = [], {}
    api_rows = []
    window = None
    with open(args.trace, newline="") as f:
        for r in csv.DictReader(f):
            row = (int(r["start_ns"]), int(r["end_ns"]), int(r["stream"]), int(r["correlation"]), r["name"], r["kind"])
            if r["kind"] == "window":
                window = row
            elif r["kind"] in ("runtime", "driver"):
                api_rows.append(row)
                # A launch made through the runtime shows twice (runtime and driver call, one
                # correlation id): the runtime's, the outer one, is the one that returns last.
                prev = apis.get(row[3])
                if prev is None or row[1] > prev[1]:
                    apis[row[3]] = row
            else:
                works.append(row)
    if not works:
        sys.exit(f"{args.trace}: no GPU work recorded (was cudaProfilerStart called? LM2_TRACE_ALL=1 records all)")
    works.sort()
    names = demangle([w[4] for w in works if w[5] == "kernel"])
    label = lambda w: short(names.get(w[4], w[4])) if w[5] == "kernel" else w[4]
    us = lambda ns: ns / 1e3

    t0, t1 = works[0][0], max(w[1] for w in works)
    merged = []  # the union of the works' intervals
    for s, e, *_ in works:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    busy = sum(e - s for s, e in merged)
    own = sum(w[1] - w[0] for w in works)
    if window is not None:
        print(f"traced call (cudaProfilerStart..Stop): {us(window[1] - window[0]):.1f} us; its first GPU work began "
              f"{us(t0 - window[0]):.1f} us into it, its last ended {us(window[1] - t1):.1f} us before its end")
    print(f"{len(works)} GPU works over {us(t1 - t0):.1f} us: some work running {us(busy):.1f} us "
          f"({100 * busy / (t1 - t0):.1f}%), idle {us(t1 - t0 - busy):.1f} us; the works' own times sum to "
          f"{us(own):.1f} us ({own / busy:.2f}x the union: their overlap)")

    by_stream = defaultdict(list)
    for w in works:
        by_stream[w[2]].append(w)
    for stream, ws in sorted(by_stream.items(), key=lambda kv: -sum(w[1] - w[0] for w in kv[1])):
        t = sum(w[1] - w[0] for w in ws)
        print(f"  stream {stream}: {len(ws)} works, {us(t):.1f} us ({100 * t / (t1 - t0):.1f}% of the span)")

    # Gaps: between consecutive pieces of the union; the work after a gap is the first to start.
    gaps = []
    idx = 0
    for (s0, e0), (s1, e1) in zip(merged, merged[1:]):
        while works[idx][0] < s1:
            idx += 1
        after = works[idx]
        before = max((w for w in works if w[1] <= s1 and w[1] >= e0 - 1), key=lambda w: w[1], default=None)
        api = apis.get(after[3])
        late = api is not None and api[1] > e0  # the launch returned after the GPU went idle
        gaps.append((s1 - e0, e0, before, after, api, late))
    total_gap = sum(g[0] for g in gaps)
    host_late = sum(g[0] for g in gaps if g[5])
    print(f"\n{len(gaps)} idle gaps, {us(total_gap):.1f} us in all; {us(host_late):.1f} us of them in gaps "
          f"whose next work's launch returned after the GPU had gone idle (host-bound)")
    listed = [g for g in sorted(gaps, key=lambda g: -g[0]) if us(g[0]) >= args.min_gap_us][: args.gaps]
    for gap, e0, before, after, api, late in listed:
        launch = (f"launch {api[4]} returned {us(api[1] - e0):+.1f} us from the idle start" if api
                  else "launch not recorded")
        print(f"  {us(gap):7.1f} us at +{us(e0 - t0):8.1f}: {label(before) if before else '?'} (stream "
              f"{before[2] if before else '?'}) -> {label(after)} (stream {after[2]}); {launch}"
              f"{'  HOST' if late else ''}")

    totals = defaultdict(lambda: [0, 0])
    for w in works:
        totals[label(w)][0] += 1
        totals[label(w)][1] += w[1] - w[0]
    print("\nGPU works by name (count, total us, mean us):")
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {t / 1e3:9.1f} {n:5d} {t / n / 1e3:8.2f}  {name}")

    if api_rows:
        calls = defaultdict(lambda: [0, 0])
        for s, e, _, _, name, kind in api_rows:
            calls[f"{kind} {name}"][0] += 1
            calls[f"{kind} {name}"][1] += e - s
        h0, h1 = min(a[0] for a in api_rows), max(a[1] for a in api_rows)
        print(f"\nhost API calls over {us(h1 - h0):.1f} us (by total time, top 12: count, total us, mean us):")
        for name, (n, t) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  {t / 1e3:9.1f} {n:5d} {t / n / 1e3:8.2f}  {name}")
        lead = [w[0] - apis[w[3]][1] for w in works if w[3] in apis]
        if lead:
            lead.sort()
            print(f"host ahead of the GPU (a work's start minus its launch's return), us: min {us(lead[0]):.1f}, "
                  f"10th percentile {us(lead[len(lead) // 10]):.1f}, median {us(statistics.median(lead)):.1f}, "
                  f"max {us(lead[-1]):.1f}")


if __name__ == "__main__":
    main()
