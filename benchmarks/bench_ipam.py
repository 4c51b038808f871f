"""Benchmark: one IPAM allocate + release with 10, 1,000 and 10,000 addresses already held.

Every container spawn on a bridge network allocates an address and every teardown releases
it, so this cost sits on the spawn path (issue 3: per-child spawn cost at 1,000 children
within 1.5x of the cost at 10). Measured in one run, in interleaved rounds (each round takes
a batch of cycles at every size, in a shuffled order, so machine noise hits all sizes
alike), on tmpfs like the real state (``/dev/shm``, else the temporary directory):

  one handle    allocate and release on the same Ipam (one lab process)
  two handles   allocate on one Ipam, release on another opened on the same network, as two
                processes sharing a state directory do: each operation first reads the
                other's change

Reported per size: the median cycle, the mean cycle (which includes the journal's periodic
compaction: each size runs several compaction periods, so the mean is the amortized cost)
and both as a ratio to the 10-address cost. Target: ratio <= 1.5 at 1,000.

Run:  python3 benchmarks/bench_ipam.py [--sizes 10,1000,10000] [--rounds 10]
      python3 benchmarks/bench_ipam.py --impl /tmp/old_ipam.py --cycles 400   # another version
(``git show 90532bc:nslab/ipam.py > /tmp/old_ipam.py`` gives the one-file version the journal replaced;
that version rewrites the whole state per change, so give it a few hundred cycles, not the
default, or 10,000 takes minutes.) It prints a markdown section; it does not write RESULTS.md.
No root needed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from _results import machine_line

SUBNET = "10.0.0.0/16"               # 65,534 usable: room for 10,000 and the churn
SLACK = 256                          # nslab.ipam._COMPACT_SLACK, for the default cycle count


def load_ipam(path: str | None):
    """nslab.ipam, or the module at ``path`` loaded as a sibling (its relative imports work)."""
    if path is None:
        import nslab.ipam
        return nslab.ipam
    spec = importlib.util.spec_from_file_location("nslab._bench_ipam_impl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(ipam_mod, sizes: list[int], rounds: int, cycles: int | None, base: str, label: str) -> str:
    where = machine_line()
    top = tempfile.mkdtemp(prefix="bench-ipam-", dir=base)
    scenarios = ("one handle", "two handles")
    handles, fill = {}, {}
    try:
        for size in sizes:
            for scenario in scenarios:
                d = os.path.join(top, f"{size}-{scenario.replace(' ', '-')}")
                a = ipam_mod.Ipam(d, "bench", SUBNET)
                b = ipam_mod.Ipam(d, "bench", SUBNET) if scenario == "two handles" else a
                t0 = time.perf_counter()
                for i in range(size):
                    a.allocate(f"lab/held-{i}")
                fill[size] = time.perf_counter() - t0
                b.allocations()
                handles[size, scenario] = (a, b)
        per_size = {size: cycles or 3 * (size + SLACK) // 2 for size in sizes}
        samples: dict[tuple[int, str], list[tuple[float, float]]] = {k: [] for k in handles}

        def batch(key, n, keep):
            a, b = handles[key]
            out = samples[key]
            for k in range(n):
                t0 = time.perf_counter()
                addr = a.allocate(f"lab/churn-{k}")
                t1 = time.perf_counter()
                b.release(addr)
                t2 = time.perf_counter()
                if keep:
                    out.append((t1 - t0, t2 - t1))

        keys = list(handles)
        for key in keys:                                   # warm-up: caches, first reloads
            batch(key, 50, keep=False)
        for _ in range(rounds):
            random.shuffle(keys)
            for key in keys:
                batch(key, max(1, per_size[key[0]] // rounds), keep=True)
    finally:
        for a, b in handles.values():
            a.close()
            b.close()
        shutil.rmtree(top, ignore_errors=True)

    lines = [
        "## IPAM",
        "",
        f"One allocate + release with N addresses held ({label}; `benchmarks/bench_ipam.py`,",
        f"{rounds} interleaved rounds, state on {base}; times in µs).",
        "",
        f"Machine: {where}.",
        "",
        "| handles | held N | cycles | allocate median | release median | cycle median | "
        "cycle mean | median / N=%d | mean / N=%d |" % (sizes[0], sizes[0]),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for scenario in scenarios:
        base_med = base_mean = None
        for size in sizes:
            xs = samples[size, scenario]
            alloc = statistics.median(x for x, _ in xs) * 1e6
            rel = statistics.median(y for _, y in xs) * 1e6
            cyc = [x + y for x, y in xs]
            med, mean = statistics.median(cyc) * 1e6, statistics.fmean(cyc) * 1e6
            if base_med is None:
                base_med, base_mean = med, mean
            lines.append(f"| {scenario} | {size:,} | {len(xs)} | {alloc:.1f} | {rel:.1f} | {med:.1f} | "
                         f"{mean:.1f} | **{med / base_med:.2f}** | **{mean / base_mean:.2f}** |")
            if size == 1000:
                verdicts.append(f"- {scenario}: 1,000 vs {sizes[0]}: median ratio {med / base_med:.2f}, "
                                f"mean ratio {mean / base_mean:.2f} (target <= 1.5) -> "
                                f"{'met' if max(med / base_med, mean / base_mean) <= 1.5 else 'NOT met'}.")
    lines += ["", *verdicts, "",
              "Filling (one handle, N sequential allocations): "
              + ", ".join(f"N={s:,}: {fill[s]:.2f} s" for s in sizes) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,10000",
                    help="held addresses, comma-separated; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=None,
                    help="measured cycles per size (default: 1.5 x (N + 256), three compaction "
                         "periods of the journal)")
    ap.add_argument("--impl", default=None, help="benchmark this ipam.py instead of nslab.ipam")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the state directories go (default: /dev/shm, tmpfs like /run)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ipam_mod = load_ipam(args.impl)
    label = f"implementation {args.impl}" if args.impl else "nslab.ipam"
    print(run(ipam_mod, sizes, args.rounds, args.cycles, args.dir or tempfile.gettempdir(), label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
