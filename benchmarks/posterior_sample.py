"""Time `tmcgraph.Posterior.sample` (backward sampling through the contraction) on a data set's model.

One TMC draw at K, then ``--repeats`` timed calls of ``sample(S)`` for each S, torch threads pinned; prints the
median seconds per call.  For an A/B between checkouts run it from outside the repository with
``PYTHONPATH=<checkout>``.

Run: python benchmarks/posterior_sample.py --dataset radon --K 10 --samples 100 1000 [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="radon")
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = importlib.import_module(f"tmcgraph.datasets.{args.dataset}").load()
    post = ds.model().compile(K=args.K).posterior(ds.train)
    for s in args.samples:
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            post.sample(s)
            times.append(time.perf_counter() - began)
        print(f"{ds.name} K={args.K} sample({s}): {statistics.median(times):.3f} s (median of {args.repeats}, "
              f"{args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
