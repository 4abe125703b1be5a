"""A/B of the eager evaluator's mechanisms, each against the same lowered program without it, on the
contraction graphs:

* the fast path (one underflow sync per evaluation) against the program's exact mode, where every
  pairwise step checks and repairs on its own (forward and forward+backward);
* the whole-plan backward (one autograd Function for the program, saved blocks reused) against one
  custom Function per pairwise step (forward+backward);
* the no-grad scratch buffers of the program against fresh allocations (forward).

Everything runs in one process, interleaved, with medians over repeats and torch threads pinned; the
numbers that matter are the ratios printed (without / with, and fwd+bwd / fwd).

Run: python benchmarks/kernels_ab.py --threads 1 2 --repeats 7 [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
from contract import GRAPHS  # noqa: E402

import tmcgraph.evaluate.kernels as kernels  # noqa: E402
import tmcgraph.evaluate.program as program_module  # noqa: E402
from tmcgraph import evaluate  # noqa: E402
from tmcgraph.arguments import output_file  # noqa: E402
from tmcgraph.testing import random_factors  # noqa: E402


@contextlib.contextmanager
def no_scratch():
    """Fresh allocations for every shifted exponential of the program (the reference for the scratch buffers)."""
    saved = kernels._scratch, program_module._scratch
    kernels._scratch = program_module._scratch = lambda slot, x: None  # type: ignore[assignment]
    try:
        yield
    finally:
        kernels._scratch, program_module._scratch = saved  # type: ignore[assignment]


def measure(name: str, threads: int, repeats: int) -> Dict[str, float]:
    torch.set_num_threads(threads)
    graph = GRAPHS[name]()
    plan = graph.compile()
    factors = random_factors(graph, seed=0, scale=1.0, dtype=torch.float32)
    tensors = [factors[spec.name] for spec in plan.inputs]
    leaves = [t.clone().requires_grad_() for t in tensors]
    program = evaluate.lower(plan, [tuple(t.shape) for t in tensors])
    per_pair = copy.copy(program)  # the same program with one autograd Function per pairwise step
    per_pair._whole_plan = False

    def forward():
        with torch.no_grad():
            program(tensors)

    def forward_steps():
        with torch.no_grad():
            program._evaluate(tensors, 0)

    def fwd_bwd(p=program):
        return torch.autograd.grad(p(leaves), leaves)

    def fwd_bwd_steps():
        return torch.autograd.grad(program._evaluate(leaves, 0)[0], leaves)

    def forward_fresh():
        with no_scratch():
            forward()

    fns = {"fwd": forward, "fwd_fresh": forward_fresh, "fwd_steps": forward_steps,
           "fb": fwd_bwd, "fb_steps": fwd_bwd_steps, "fb_pairs": lambda: fwd_bwd(per_pair)}
    want = fwd_bwd_steps()
    err = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(fwd_bwd(), want))
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"graph": name, "threads": threads,
            "steps_over_program_fwd": med["fwd_steps"] / med["fwd"],
            "steps_over_program_fwd_bwd": med["fb_steps"] / med["fb"],
            "per_pair_over_whole_plan_fwd_bwd": med["fb_pairs"] / med["fb"],
            "fresh_over_scratch_fwd": med["fwd_fresh"] / med["fwd"],
            "program_fwd_bwd_over_fwd": med["fb"] / med["fwd"],
            "max_relative_gradient_difference": err}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, float32, medians of {args.repeats} interleaved repeats")
    print(f"{'graph':<26}{'threads':>8}{'fwd steps/prog':>15}{'fb steps/prog':>14}{'fb pairs/plan':>14}"
          f"{'fwd fresh/scratch':>18}{'prog fb/f':>10}{'grad diff':>11}")
    for name in args.graphs:
        for threads in args.threads:
            r = measure(name, threads, args.repeats)
            rows.append(r)
            print(f"{name:<26}{threads:>8}{r['steps_over_program_fwd']:>15.2f}{r['steps_over_program_fwd_bwd']:>14.2f}"
                  f"{r['per_pair_over_whole_plan_fwd_bwd']:>14.2f}{r['fresh_over_scratch_fwd']:>18.2f}"
                  f"{r['program_fwd_bwd_over_fwd']:>10.2f}{r['max_relative_gradient_difference']:>11.1e}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
