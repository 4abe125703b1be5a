"""Peak memory of one evaluation against the plan's lower bound: the largest step's result and operands.

For each contraction graph of ``benchmarks/contract.py`` and each mode (forward without grad; forward and
backward), a fresh process builds the plan and the float32 factors, reads its peak resident memory
(``ru_maxrss``) after a tiny evaluation (one-time set-up), evaluates once and reads it again.  The growth
is the evaluation's peak (new pages it touched), reported against the bound ``max over steps of (result +
operands) * 4 bytes`` (a step cannot run in less; a backward keeps more).  Peak resident memory is a CPU
measure: allocator caching can hide reuse, never add to it.

    python benchmarks/memory.py --json benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys

from _util import write_json  # benchmarks/, the script's directory

from tmcgraph.arguments import output_file

GRAPH_NAMES = ["chain n=20 K=64", "global+local N=1000 K=64", "appendix H N=100 K=64", "grid 6x6 K=16"]


def bound_bytes(plan) -> int:
    """max over steps of (result + operands) elements, in float32 bytes."""
    best = 0
    for step in plan.steps:
        operands = sum(math.prod(plan._sizes_of(labels)) for labels in step.operand_labels)
        best = max(best, step.size + operands)
    return 4 * best


def measure(name: str, mode: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from contract import GRAPHS, chain

    torch.set_num_threads(threads)
    small = chain(5, 4)  # a tiny evaluation first: one-time library and interpreter set-up is not the plan's
    tiny = {n: torch.randn(small.factor_shape(n), requires_grad=True) for n in small.factors}
    torch.autograd.grad(small.compile().log_sum(tiny), list(tiny.values()))
    with torch.no_grad():
        small.compile().log_sum(tiny)
    graph = GRAPHS[name]()
    plan = graph.compile()
    gen = torch.Generator().manual_seed(0)
    factors = {n: torch.randn(graph.factor_shape(n), generator=gen) for n in graph.factors}
    if mode == "fwd+bwd":
        factors = {n: t.requires_grad_() for n, t in factors.items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    if mode == "fwd":
        with torch.no_grad():
            plan.log_sum(factors)
    else:
        torch.autograd.grad(plan.log_sum(factors), list(factors.values()))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = 4 * sum(t.numel() for t in factors.values())
    return {"graph": name, "mode": mode, "peak_growth_bytes": after - before, "bound_bytes": bound_bytes(plan),
            "inputs_bytes": inputs, "ratio": (after - before) / bound_bytes(plan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--one", nargs=2, metavar=("GRAPH", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.threads)))
        return
    rows = []
    print(f"{'graph':<26}{'mode':>9}{'peak growth':>14}{'bound':>12}{'peak / bound':>14}{'inputs':>12}")
    for name in GRAPH_NAMES:
        for mode in ("fwd", "fwd+bwd"):
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", name, mode],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            mb = 1 / 2 ** 20
            print(f"{name:<26}{mode:>9}{row['peak_growth_bytes'] * mb:>11.1f} MB{row['bound_bytes'] * mb:>9.1f} MB"
                  f"{row['ratio']:>14.2f}{row['inputs_bytes'] * mb:>9.1f} MB", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
