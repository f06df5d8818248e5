"""Summaries of Nsight Compute's CSV (ncu --csv --log-file) for bench/cuda/profile_prefill
and bench/cuda/profile_decode, printed as markdown tables.

  ncu_summary.py by-kernel CSV    every kernel's gpu__time_duration summed by kernel (name,
                                  grid, block), with its share of the total
  ncu_summary.py per-kernel CSV   per kernel: mean time, DRAM bytes read and % of peak,
                                  registers, grid x block, warps active (profile_decode's metrics)
"""
import collections
import csv
import sys

_TIME_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
_BYTES_MB = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}


def rows(path):
    """The CSV's metric rows (ncu's own '==' lines dropped)."""
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("==")))


def kernel_name(raw, width):
    """A kernel's name without its parameters, namespaces or 'void', cut to width."""
    name = raw.replace("(anonymous namespace)::", "").split("(")[0].strip()
    name = name.removeprefix("void ").replace("lm2::runtime::cuda::", "").replace("lm2::<unnamed>::", "")
    return name[:width]


def number(value):
    return float(value.replace(",", ""))


def by_kernel(path):
    by = collections.defaultdict(lambda: [0, 0.0])
    for r in rows(path):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = f"{kernel_name(r['Kernel Name'], 80)} grid {r.get('Grid Size', '?')} x {r.get('Block Size', '?')}"
        by[name][0] += 1
        by[name][1] += number(r["Metric Value"]) * _TIME_US[r["Metric Unit"]]
    total = sum(v[1] for v in by.values())
    print(f"{sum(v[0] for v in by.values())} kernels, {total / 1e3:.2f} ms in all (run one at a time)\n")
    print("| kernel | launches | total ms | share |")
    print("| --- | --- | --- | --- |")
    for name, (n, us) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {us / 1e3:.3f} | {100 * us / total:.1f}% |")


def per_kernel(path):
    launches = collections.OrderedDict()  # launch ID -> name and its metrics (unit, value)
    for r in rows(path):
        m = launches.setdefault(r["ID"], {"name": kernel_name(r["Kernel Name"], 60)})
        m[r["Metric Name"]] = (r["Metric Unit"], r["Metric Value"])
    agg = collections.defaultdict(lambda: collections.defaultdict(float))
    for m in launches.values():
        a = agg[m["name"]]
        a["n"] += 1
        unit, t = m["gpu__time_duration.sum"]
        a["us"] += number(t) * _TIME_US[unit]
        unit, b = m["dram__bytes_read.sum"]
        a["MB"] += number(b) * _BYTES_MB[unit]
        a["dram%"] += number(m["dram__throughput.avg.pct_of_peak_sustained_elapsed"][1])
        a["occ%"] += number(m["sm__warps_active.avg.pct_of_peak_sustained_active"][1])
        a["regs"] = number(m["launch__registers_per_thread"][1])
        a["grid"] = number(m["launch__grid_size"][1])
        a["block"] = number(m["launch__block_size"][1])
    print("| kernel | launches | us each | MB read each | GB/s | DRAM % of peak | regs | grid x block | warps active % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, a in sorted(agg.items(), key=lambda kv: -kv[1]["us"]):
        c = a["n"]
        print(f"| {name} | {c:.0f} | {a['us'] / c:.1f} | {a['MB'] / c:.2f} | {a['MB'] / a['us'] * 1e3:.0f} | "
              f"{a['dram%'] / c:.0f} | {a['regs']:.0f} | {a['grid']:.0f} x {a['block']:.0f} | {a['occ%'] / c:.0f} |")


if __name__ == "__main__":
    modes = {"by-kernel": by_kernel, "per-kernel": per_kernel}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        sys.exit("usage: ncu_summary.py {by-kernel|per-kernel} CSV")
    modes[sys.argv[1]](sys.argv[2])
