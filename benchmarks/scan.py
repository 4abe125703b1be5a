"""Chains: sequential message passing against the parallel scan (``FactorGraph.compile(scan=...)``).

A chain of ``n`` indices of size ``K`` with a pairwise factor per link and a unary factor per index
(an HMM's transitions and emissions), float32, forward (no grad) and forward+backward, timed
interleaved (never, always, never, ...), medians of ``--repeats``, per torch thread count.  Prints
``never / always`` (above 1: the scan is faster) and which one ``scan="auto"`` picks, so the cost
model of :func:`tmcgraph.compile.compile_stages` can be checked against the machine.

    python benchmarks/scan.py --threads 1 2 --repeats 9 --json benchmarks/results/scan.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _util import write_json  # benchmarks/, the script's directory

import tmcgraph
from tmcgraph.arguments import output_file
from tmcgraph.stages import ScanStage


def chain(n: int, k: int) -> tmcgraph.FactorGraph:
    g = tmcgraph.FactorGraph()
    for i in range(n):
        g.index(f"z{i}", k)
        g.factor(f"u{i}", [f"z{i}"])
    for i in range(1, n):
        g.factor(f"f{i}", [f"z{i - 1}", f"z{i}"])
    return g


def run(n: int, k: int, repeats: int) -> dict:
    g = chain(n, k)
    plans = {mode: g.compile(scan=mode) for mode in ("never", "always")}
    gen = torch.Generator().manual_seed(0)
    f = {name: torch.randn(g.factor_shape(name), generator=gen) for name in g.factors}
    fg = {name: t.clone().requires_grad_() for name, t in f.items()}

    def fwd(plan):
        with torch.no_grad():
            plan.log_sum(f)

    def bwd(plan):
        torch.autograd.grad(plan.log_sum(fg), list(fg.values()))

    times: dict = {(m, w): [] for m in plans for w in ("fwd", "fwd+bwd")}
    for _ in range(2):
        for p in plans.values():
            fwd(p)
            bwd(p)
    for _ in range(repeats):
        for mode, p in plans.items():
            for what, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
                start = time.perf_counter()
                fn(p)
                times[(mode, what)].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    auto = any(isinstance(s, ScanStage) for s in g.compile().stages)
    return {"n": n, "K": k, "auto_scans": auto,
            "never_over_always_fwd": med[("never", "fwd")] / med[("always", "fwd")],
            "never_over_always_fwd+bwd": med[("never", "fwd+bwd")] / med[("always", "fwd+bwd")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ns", type=int, nargs="+", default=[20, 50, 200])
    parser.add_argument("--Ks", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--json", type=output_file, default=None)
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.ns:
            for k in args.Ks:
                row = run(n, k, args.repeats)
                row["threads"] = threads
                rows.append(row)
                print(f"threads={threads} n={n:<4} K={k:<4} never/always fwd {row['never_over_always_fwd']:5.2f}x  "
                      f"fwd+bwd {row['never_over_always_fwd+bwd']:5.2f}x  auto scans: {row['auto_scans']}",
                      flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
