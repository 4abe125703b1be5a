"""A/B of two evaluator mechanisms, each against the same code without it, on the contraction graphs:

* the pairwise step's custom backward (a softmax-weighted contraction of the saved exponentials)
  against autograd through the plain fast path (fwd+bwd times);
* the no-grad scratch buffers (shift and exponentiate into reused memory) against fresh allocations
  (forward times).

Everything runs in one process, interleaved, with medians over repeats and torch threads pinned; the
numbers that matter are the ratios printed (without / with, and fwd+bwd / fwd).

Run: python benchmarks/kernels_ab.py --threads 1 2 --repeats 7 [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
from contract import GRAPHS  # noqa: E402

import tmcgraph._kernels as kernels  # noqa: E402
from tmcgraph.testing import random_factors  # noqa: E402


@contextlib.contextmanager
def plain_backward():
    """Route pairwise steps through autograd of the plain path (the reference)."""
    saved = kernels._LogContractPair.apply

    def plain(a, b, la, lb, out):
        return kernels._plain_pair(a, la, b, lb, out)

    kernels._LogContractPair.apply = plain  # type: ignore[method-assign]
    try:
        yield
    finally:
        kernels._LogContractPair.apply = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def no_scratch():
    """Fresh allocations for every shifted exponential (the reference for the scratch buffers)."""
    saved = kernels._SCRATCH_MIN_ELEMENTS
    kernels._SCRATCH_MIN_ELEMENTS = 1 << 62
    try:
        yield
    finally:
        kernels._SCRATCH_MIN_ELEMENTS = saved


def measure(name: str, threads: int, repeats: int) -> Dict[str, float]:
    torch.set_num_threads(threads)
    graph = GRAPHS[name]()
    plan = graph.compile()
    factors = random_factors(graph, seed=0, scale=1.0, dtype=torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in factors.items()}

    def forward():
        with torch.no_grad():
            plan.log_sum(factors)

    def fwd_bwd():
        torch.autograd.grad(plan.log_sum(leaves), list(leaves.values()))

    def fwd_bwd_plain():
        with plain_backward():
            fwd_bwd()

    def forward_fresh():
        with no_scratch():
            forward()

    fns = {"fwd": forward, "fwd_fresh": forward_fresh, "custom": fwd_bwd, "plain": fwd_bwd_plain}
    with plain_backward():  # the two backwards agree (to float rounding)
        want = torch.autograd.grad(plan.log_sum(leaves), list(leaves.values()))
    got = torch.autograd.grad(plan.log_sum(leaves), list(leaves.values()))
    err = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want))
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"graph": name, "threads": threads, "fresh_over_scratch_fwd": med["fwd_fresh"] / med["fwd"],
            "plain_over_custom": med["plain"] / med["custom"],
            "custom_fwd_bwd_over_fwd": med["custom"] / med["fwd"], "plain_fwd_bwd_over_fwd": med["plain"] / med["fwd"],
            "max_relative_gradient_difference": err}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, float32, medians of {args.repeats} interleaved repeats")
    print(f"{'graph':<26}{'threads':>8}{'fwd fresh/scratch':>18}{'fb plain/custom':>16}{'custom fb/f':>13}"
          f"{'plain fb/f':>12}{'grad diff':>11}")
    for name in args.graphs:
        for threads in args.threads:
            r = measure(name, threads, args.repeats)
            rows.append(r)
            print(f"{name:<26}{threads:>8}{r['fresh_over_scratch_fwd']:>18.2f}{r['plain_over_custom']:>16.2f}"
                  f"{r['custom_fwd_bwd_over_fwd']:>13.2f}"
                  f"{r['plain_fwd_bwd_over_fwd']:>12.2f}{r['max_relative_gradient_difference']:>11.1e}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
