"""The ``tmcgraph`` command line: ``tmcgraph demo`` (more subcommands come with the estimators)."""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from .graph import FactorGraph
from .testing import brute_force_log_sum, random_factors


def demo_graph(*, num_data: int, num_theta: int, num_z: int, num_loop: int) -> FactorGraph:
    """The demo's graph: appendix A of the TMC paper in one model.

    A global latent theta with a local z_i per data point (Fig. 6: prior on theta,
    a likelihood factor per data point), plus a loop of three latents a-b-c that
    all depend on theta (a Fig. 5 style loopy factor graph).
    """
    g = FactorGraph()
    g.plate("N", num_data)
    g.index("theta", num_theta)
    g.index("z", num_z, plates=["N"])
    for name in ("a", "b", "c"):
        g.index(name, num_loop)
    g.factor("prior", ["theta"])
    g.factor("lik", ["theta", "z"], plates=["N"])
    g.factor("ab", ["theta", "a", "b"])
    g.factor("bc", ["b", "c"])
    g.factor("ca", ["c", "a"])
    return g


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    small = demo_graph(num_data=3, num_theta=4, num_z=3, num_loop=3)
    factors = random_factors(small, seed=args.seed, scale=args.scale)
    plan = small.compile()
    print("== a small graph, checked against brute-force enumeration (float64) ==")
    print(plan.describe())
    value = plan.log_sum(factors).item()
    oracle = brute_force_log_sum(small, factors).item()
    print(f"\ncompiled log_sum    = {value:.12f}")
    print(f"brute force log_sum = {oracle:.12f}   (|difference| = {abs(value - oracle):.2e})")

    big = demo_graph(num_data=args.num_data, num_theta=args.K, num_z=args.K, num_loop=args.K)
    plan = big.compile()
    factors32 = random_factors(big, seed=args.seed, scale=args.scale, dtype=torch.float32)
    print(f"\n== the same structure at N={args.num_data}, K={args.K} (float32; brute force is out of reach) ==")
    print(plan.describe())
    start = time.perf_counter()
    value32 = plan.log_sum(factors32).item()
    seconds = time.perf_counter() - start
    reference = plan.log_sum({k: v.double() for k, v in factors32.items()}).item()
    print(f"\nlog_sum float32 = {value32:.6f} in {seconds * 1e3:.1f} ms; float64 = {reference:.6f}")
    return 0 if abs(value - oracle) < 1e-9 * max(1.0, abs(oracle)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmcgraph", description="Graph-compiled Tensor Monte Carlo for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small factor graph, check it against brute force, then scale it up")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the factor values (default 0)")
    demo.add_argument("--scale", type=float, default=3.0, help="std of the random log-factors (default 3)")
    demo.add_argument("--num-data", type=int, default=1000, help="plate size N of the large graph (default 1000)")
    demo.add_argument("--K", type=int, default=64, help="samples per latent in the large graph (default 64)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tmcgraph`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
