"""What batching sites declared in ``Model.batch_sites()`` costs and saves, against site by site.

Three declarations of the same model, interleaved, each timed on a fresh estimator:

* ``no``: sites declared one by one (the default: every function called once per site);
* ``verify``: ``Model.batch_sites()`` (the first evaluation of every input layout computes each group both
  ways and compares them);
* ``trust``: ``Model.batch_sites(verify=False)`` (batched from the first evaluation);
* ``family`` (chains only): the chain as one ``Model.markov`` family with ``Model.observe_each``.

Models: appendix H's sparse model (``tmcgraph treewidth``: N=100, p=0.01, seed 1, K=64, one evaluation
without gradients, as the experiment runs it) and a chain of T=50 latents at K=64 (one forward and backward
pass per step; ``--T`` and ``--K`` choose the chains).  Reported: the first evaluation and the median later
one, as ratios to site by site.

    python benchmarks/batch_sites.py --threads 1 2 --repeats 3 --later 3 --json benchmarks/results/batch_sites.json
    python benchmarks/batch_sites.py --no-sparse --T 10 100 --K 16 64 --repeats 3 --later 5
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Dict, List

import torch
from _util import write_json  # benchmarks/, the script's directory
from torch.distributions import Normal

import tmcgraph
from tmcgraph.arguments import output_file
from tmcgraph.experiments.treewidth import sparse_data, sparse_model, sparse_problem

MODES = ("no", "verify", "trust")


def sparse(mode: str):
    problem = sparse_problem(100, 0.01, seed=1, noise=0.1)
    return sparse_model(problem, batch=mode), sparse_data(problem), None


def chain(mode: str, T: int = 50):
    loc = torch.zeros(T, requires_grad=True)
    m = tmcgraph.Model()
    sd = math.sqrt(1 - 0.81)
    x = torch.randn(T, generator=torch.Generator().manual_seed(0))
    if mode == "family":  # the same chain as one Model.markov family
        m.markov("z", T, init=lambda: Normal(0.0, 1.0), transition=lambda prev: Normal(0.9 * prev, sd),
                 proposal=lambda t: Normal(loc[t], 1.0))
        m.observe_each("x", "z", lambda z: Normal(z, 1.0))
        return m, {f"x_{t}": x[t] for t in range(T)}, loc
    m.latent("z0", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc[0], 1.0))
    block = m.batch_sites(verify=mode == "verify") if mode != "no" else None
    if block is not None:
        block.__enter__()
    for t in range(1, T):
        m.latent(f"z{t}", prior=lambda prev: Normal(0.9 * prev, sd), proposal=lambda t=t: Normal(loc[t], 1.0),
                 parents=[f"z{t - 1}"], proposal_parents=[])
    for t in range(T):
        m.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
    if block is not None:
        block.__exit__(None, None, None)
    return m, {f"x{t}": x[t] for t in range(T)}, loc


def evaluate(est, data, leaf) -> float:
    start = time.perf_counter()
    if leaf is None:
        with torch.no_grad():
            est.log_marginal(data)
    else:
        est.log_marginal(data).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--later", type=int, default=5, help="later evaluations timed per repeat")
    parser.add_argument("--T", type=int, nargs="+", default=[50], help="chain lengths")
    parser.add_argument("--K", type=int, nargs="+", default=[64], help="samples per latent of the chains")
    parser.add_argument("--no-sparse", action="store_true", help="chains only")
    parser.add_argument("--json", type=output_file, default=None)
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases = [] if args.no_sparse else [("sparse N=100 K=64", sparse, 64, MODES)]
        cases += [(f"chain T={T} K={K}", functools.partial(chain, T=T), K, MODES + ("family",))
                  for T in args.T for K in args.K]
        for name, build, K, modes in cases:
            first: Dict[str, List[float]] = {m: [] for m in modes}
            later: Dict[str, List[float]] = {m: [] for m in modes}
            for r in range(args.repeats):
                for mode in modes:  # interleaved: the machine is shared and noisy
                    model, data, leaf = build(mode)
                    est = model.compile(K=K)
                    torch.manual_seed(r)
                    first[mode].append(evaluate(est, data, leaf))
                    later[mode].append(statistics.median(evaluate(est, data, leaf) for _ in range(args.later)))
            med = statistics.median
            for mode in modes:
                row = {"model": name, "threads": threads, "mode": mode,
                       "first_over_site_by_site": med(first[mode]) / med(first["no"]),
                       "later_over_site_by_site": med(later[mode]) / med(later["no"])}
                rows.append(row)
                print(f"threads={threads} {name:<18} {mode:<6} first {row['first_over_site_by_site']:5.2f}x  "
                      f"later {row['later_over_site_by_site']:5.2f}x  (of site by site)", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
