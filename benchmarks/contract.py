"""Contraction benchmark: plan quality and evaluation speed on TMC-shaped graphs.

Run (prints a table, writes JSON)::

    pip install -e ".[bench]"
    python benchmarks/contract.py --threads 1 2 --repeats 15 --json benchmarks/results/contract.json

Graphs: a 20-chain (K=64); the global + local model of appendix A, Fig. 6
(K_theta=64, plate N=1000, K=64); the appendix H graph (100 latents, 100
observations, C_ij ~ Bernoulli(0.01), seeded, K=64); a 6x6 grid (K=16).

Columns: FLOPs of our plan beside opt_einsum's greedy and dp paths and cotengra's
hyper-optimizer; compile time; then times (medians, interleaved) of tmcgraph
forward and forward+backward, the same path in the linear domain with plain
torch.einsum on exp'd float64-safe operands (the floor), and Pyro's
``pyro.ops.contract.einsum`` with the ``torch_log`` backend.  Speed is reported as
ratios to the floor measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from opt_einsum import get_symbol

import tmcgraph
from tmcgraph import paths
from tmcgraph.arguments import output_file


def chain(n: int = 20, k: int = 64) -> tmcgraph.FactorGraph:
    g = tmcgraph.FactorGraph()
    for i in range(n):
        g.index(f"z{i}", k)
    g.factor("p0", ["z0"])
    for i in range(1, n):
        g.factor(f"f{i}", [f"z{i - 1}", f"z{i}"])
    return g


def global_local(n: int = 1000, k_theta: int = 64, k: int = 64) -> tmcgraph.FactorGraph:
    g = tmcgraph.FactorGraph().plate("N", n).index("theta", k_theta).index("z", k, plates=["N"])
    return g.factor("prior", ["theta"]).factor("lik", ["theta", "z"], plates=["N"])


def appendix_h(n: int = 100, p: float = 0.01, k: int = 64, seed: int = 1) -> tmcgraph.FactorGraph:
    """z_j ~ N(0,1), x_i ~ N(sum_j C_ij z_j, 0.1^2): one factor per prior and per observation.

    Seed 1: tree-width 3, at most 4 parents per observation (seed 0 draws an
    observation with 6 parents, a 64^6 factor that no method can hold).
    """
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(n, n, generator=gen) < p
    g = tmcgraph.FactorGraph()
    for j in range(n):
        g.index(f"z{j}", k)
        g.factor(f"prior{j}", [f"z{j}"])
    for i in range(n):
        parents = [f"z{j}" for j in range(n) if c[i, j]]
        if parents:
            g.factor(f"obs{i}", parents)
    return g


def grid(side: int = 6, k: int = 16) -> tmcgraph.FactorGraph:
    g = tmcgraph.FactorGraph()
    for r in range(side):
        for c in range(side):
            g.index(f"z{r}_{c}", k)
            g.factor(f"u{r}_{c}", [f"z{r}_{c}"])
            if r:
                g.factor(f"v{r}_{c}", [f"z{r - 1}_{c}", f"z{r}_{c}"])
            if c:
                g.factor(f"h{r}_{c}", [f"z{r}_{c - 1}", f"z{r}_{c}"])
    return g


GRAPHS: Dict[str, Callable[[], tmcgraph.FactorGraph]] = {
    "chain n=20 K=64": chain,
    "global+local N=1000 K=64": global_local,
    "appendix H N=100 K=64": appendix_h,
    "grid 6x6 K=16": grid,
}


def _equation(g: tmcgraph.FactorGraph) -> tuple:
    """The graph as one einsum (only for plate-free graphs, and Fig. 6 with N as a label)."""
    sym = {name: get_symbol(i) for i, name in enumerate(list(g.plates) + list(g.indices))}
    terms = []
    for f in g.factors.values():
        terms.append("".join(sym[p] for p in f.plates) + "".join(sym[i] for i in f.indices))
    return terms, sym


def _to_letters(terms: List[str], output: str = "") -> str:
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    labels = list(dict.fromkeys("".join(terms)))
    if len(labels) > len(letters):
        return ""  # torch.einsum (and so Pyro's torch_log backend) takes letters only
    rename = {c: letters[k] for k, c in enumerate(labels)}
    return ",".join("".join(rename[c] for c in t) for t in terms) + "->" + "".join(rename[c] for c in output)


def _median_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Interleave the candidates, repeat, take medians (seconds)."""
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def plan_flops(g: tmcgraph.FactorGraph, with_cotengra: bool) -> Dict[str, float]:
    start = time.perf_counter()
    plan = g.compile(optimize="tree")
    compile_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    auto = g.compile(optimize="auto")
    auto_ms = 1e3 * (time.perf_counter() - start)
    out = {"tree": plan.flops, "auto": auto.flops, "compile_tree_ms": compile_ms, "compile_auto_ms": auto_ms}
    # the other optimizers on the plate-free einsum (or per stage, summed)
    products = sum(step.flops for step in auto.steps if step.kind == "product")
    for name in ["greedy", "dp"] + (["cotengra"] if with_cotengra else []):
        total = products
        for stage in auto.stages:
            if isinstance(stage, tmcgraph.compile.EinsumStage):
                if name == "dp" and len(stage.input_labels) > 60:
                    total = math.nan  # opt_einsum's dp does not finish in minutes here
                    break
                cand = paths.search(list(stage.input_labels), stage.output_labels, dict(stage.sizes), name)[0]
                total += cand.cost.flops
        out[name] = total
    return out


def speed(g: tmcgraph.FactorGraph, repeats: int, with_pyro: bool, with_compiled: bool = False) -> Dict[str, float]:
    plan = g.compile()
    gen = torch.Generator().manual_seed(0)
    factors = {n: torch.randn(g.factor_shape(n), generator=gen) for n in g.factors}
    grads = {n: t.clone().requires_grad_(True) for n, t in factors.items()}
    linear = {n: t.exp() for n, t in factors.items()}

    def forward():
        with torch.no_grad():
            return plan.log_sum(factors)

    def backward():
        out = plan.log_sum(grads)
        out.backward()
        return out

    # the floor: the same path in the linear domain, plain torch.einsum per step
    def floor():
        with torch.no_grad():
            values = [linear[s.name] for s in plan.inputs]
            for stage in plan.stages:
                ops = [values[k] for k in stage.inputs]
                if isinstance(stage, tmcgraph.compile.ProductStage):
                    lab, keep = stage.input_labels[0], stage.output_labels
                    dims = [lab.index(c) for c in lab if c not in keep]
                    x = ops[0]
                    for d in sorted(dims, reverse=True):
                        x = x.prod(dim=d)  # underflows: timing only
                    values.append(x)
                    continue
                work = list(zip(ops, stage.input_labels))
                for step in stage.steps:
                    taken = [work[p] for p in sorted(step.positions)]
                    for p in sorted(step.positions, reverse=True):
                        work.pop(p)
                    eq = _to_letters([lab for _, lab in taken], step.result_labels)
                    work.append((torch.einsum(eq, *[t for t, _ in taken]), step.result_labels))
                values.append(work[0][0])
            return values[-1]

    fns = {"tmcgraph fwd": forward, "tmcgraph fwd+bwd": backward, "linear floor": floor}
    compile_seconds = {}
    if with_compiled:
        compiled_grads = {n: t.clone().requires_grad_(True) for n, t in factors.items()}

        def compiled_fwd():
            with torch.no_grad():
                return plan.log_sum(factors, backend="compiled")

        def compiled_bwd():
            out = plan.log_sum(compiled_grads, backend="compiled")
            out.backward()
            return out

        for key, fn in (("compiled fwd", compiled_fwd), ("compiled fwd+bwd", compiled_bwd)):
            start = time.perf_counter()
            fn()  # the cold call compiles (the warm-up in _median_times then runs warm)
            compile_seconds[key] = time.perf_counter() - start
            fns[key] = fn
    if with_pyro and not g.plates:
        import pyro.ops.contract as pc

        terms, _ = _equation(g)
        eq = _to_letters(terms)
        ops = [factors[n] for n in g.factors]
        pyro_grads = [t.clone().requires_grad_(True) for t in ops]
        if eq:

            def pyro_fwd():
                with torch.no_grad():
                    return pc.einsum(eq, *ops, backend="pyro.ops.einsum.torch_log", modulo_total=False)[0]

            def pyro_bwd():
                out = pc.einsum(eq, *pyro_grads, backend="pyro.ops.einsum.torch_log", modulo_total=False)[0]
                out.backward()
                return out

            fns["pyro fwd"] = pyro_fwd
            fns["pyro fwd+bwd"] = pyro_bwd
    elif with_pyro:
        # Pyro's plated contraction: pyro.ops.contract.contract_to_tensor over the Fig. 6 model
        from pyro.ops.contract import ubersum

        n_label, t_label, z_label = "n", "t", "z"
        eq = f"{t_label},{n_label}{t_label}{z_label}->"
        ops = [factors["prior"], factors["lik"]]
        pyro_grads = [t.clone().requires_grad_(True) for t in ops]

        def pyro_fwd():
            with torch.no_grad():
                return ubersum(eq, *ops, batch_dims="n", backend="pyro.ops.einsum.torch_log", modulo_total=False)[0]

        def pyro_bwd():
            out = ubersum(eq, *pyro_grads, batch_dims="n", backend="pyro.ops.einsum.torch_log", modulo_total=False)[0]
            out.backward()
            return out

        fns["pyro fwd"] = pyro_fwd
        fns["pyro fwd+bwd"] = pyro_bwd
    times = _median_times(fns, repeats)
    times.update({f"{k} cold s": v for k, v in compile_seconds.items()})
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--no-pyro", action="store_true")
    parser.add_argument("--no-cotengra", action="store_true")
    parser.add_argument("--compiled", action="store_true",
                        help="also time backend='compiled' (and report its cold first calls, which compile)")
    parser.add_argument("--json", type=output_file, default=None, help="write the results here")
    args = parser.parse_args(argv)
    with_pyro = not args.no_pyro
    try:
        import pyro  # noqa: F401
    except ImportError:
        with_pyro = False
    with_cotengra = not args.no_cotengra and paths.cotengra_available()
    results = {}
    print(f"torch {torch.__version__}, float32, medians of {args.repeats} interleaved repeats", file=sys.stderr)
    for name in args.graphs:
        g = GRAPHS[name]()
        flops = plan_flops(g, with_cotengra)
        row = {"treewidth": g.compile().treewidth, "flops": flops, "times": {}}
        for threads in args.threads:
            torch.set_num_threads(threads)
            row["times"][threads] = speed(g, args.repeats, with_pyro, args.compiled)
        results[name] = row
        best_ref = min(v for k, v in flops.items() if k in ("dp", "cotengra") and not math.isnan(v)) if any(
            k in flops and not math.isnan(flops[k]) for k in ("dp", "cotengra")
        ) else math.nan
        print(f"\n## {name}  (tree-width {row['treewidth']})")
        print(
            "FLOPs: "
            + ", ".join(f"{k} {v:.3g}" for k, v in flops.items() if not k.startswith("compile"))
            + f"; ours/best(dp,cotengra) = {flops['auto'] / best_ref:.3f}"
            + f"; compile tree {flops['compile_tree_ms']:.1f} ms, auto {flops['compile_auto_ms']:.1f} ms"
        )
        for threads, times in row["times"].items():
            floor = times["linear floor"]
            cells = ", ".join(f"{k} {v / floor:.2f}x" for k, v in times.items()
                              if k != "linear floor" and not k.endswith("cold s"))
            cold = ", ".join(f"{k} {v:.1f}" for k, v in times.items() if k.endswith("cold s"))
            if cold:
                cells += f"; first calls (compile): {cold}"
            pyro = ""
            if "pyro fwd" in times:
                pyro = (
                    f"; pyro/ours fwd {times['pyro fwd'] / times['tmcgraph fwd']:.2f}x, "
                    f"fwd+bwd {times['pyro fwd+bwd'] / times['tmcgraph fwd+bwd']:.2f}x"
                )
                if "compiled fwd" in times:
                    pyro += (f"; pyro/compiled fwd {times['pyro fwd'] / times['compiled fwd']:.2f}x, "
                             f"fwd+bwd {times['pyro fwd+bwd'] / times['compiled fwd+bwd']:.2f}x")
            print(f"  threads={threads}: floor {floor * 1e3:.2f} ms; relative to floor: {cells}{pyro}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
