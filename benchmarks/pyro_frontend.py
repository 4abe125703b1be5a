"""One SVI gradient step of `tmcgraph.pyro.TMC_ELBO` against Pyro's ``TraceTMC_ELBO`` on the same Pyro programs.

Models (K samples per guide site; the guides are factorised, with learnable locations):

* chain T: z_1 ~ N(0, 1), z_t ~ N(0.9 z_{t-1}, 0.44), x_t ~ N(z_t, 1);
* plated N: mu ~ N(0, 1), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5) in a plate of N;
* mixture N: three cluster means mu ~ N(0, 4 I) (one site, event 3), assignments c_n enumerated in the model,
  x_n ~ N(mu_{c_n}, 1).

Each step is ``loss_and_grads`` (forward and backward, no optimizer); both estimators run interleaved in
one process with torch threads pinned; medians of ``--repeats``.  Pyro's estimate is biased on
non-factorised guides (docs/pyro.md); these guides are factorised, so both estimate the same quantity.

Run: python benchmarks/pyro_frontend.py --threads 1 --repeats 15 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceTMC_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from tmcgraph.arguments import output_file
from tmcgraph.pyro import TMC_ELBO


def chain(T: int):
    x = torch.randn(T)

    def model(x):
        z = torch.tensor(0.0)
        for t in range(T):
            z = pyro.sample(f"z{t}", dist.Normal(0.9 * z if t else z, 0.44 if t else 1.0))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[t])

    def guide(x):
        loc = pyro.param("loc", torch.zeros(T))
        for t in range(T):
            pyro.sample(f"z{t}", dist.Normal(loc[t], 1.0))

    return model, guide, x, 0


def plated(N: int):
    x = torch.randn(N)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("N", N):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        with pyro.plate("N", N):
            pyro.sample("z", dist.Normal(pyro.param("zl", torch.zeros(N)), 1.0))

    return model, guide, x, 1


def mixture(N: int):
    x = torch.cat([torch.randn(N // 2) - 2, torch.randn(N - N // 2) + 2])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
        with pyro.plate("N", N):
            c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(Vindex(mu)[..., c], 1.0), obs=x)

    def guide(x):
        loc = pyro.param("ml", torch.tensor([-2.0, 0.0, 2.0]))
        pyro.sample("mu", dist.Normal(loc, 1.0).to_event(1))

    return model, guide, x, 1


CASES: Dict[str, Callable] = {"chain T=50": lambda: chain(50), "plated N=100": lambda: plated(100),
                              "mixture N=100": lambda: mixture(100)}


def measure(name: str, K: int, repeats: int) -> Dict[str, float]:
    pyro.clear_param_store()
    model, guide, x, nesting = CASES[name]()
    ours = TMC_ELBO(num_particles=K, max_plate_nesting=nesting)
    theirs = TraceTMC_ELBO(max_plate_nesting=nesting)
    pyro_guide = config_enumerate(guide, default="parallel", num_samples=K, tmc="mixture")
    steps = {"ours": lambda: ours.loss_and_grads(model, guide, x),
             "pyro": lambda: theirs.loss_and_grads(model, pyro_guide, x)}
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # set-up: plate nesting, plans, caches
    for _ in range(repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "K": K, "ours_ms": 1e3 * med["ours"], "pyro_ms": 1e3 * med["pyro"],
            "pyro_over_ours": med["pyro"] / med["ours"]}


def split(K: int, repeats: int) -> None:
    """Median time of running the two programs under Pyro's handlers (`TMC_ELBO._get_trace`) against a step."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    model, guide, x, nesting = CASES["chain T=50"]()
    elbo = TMC_ELBO(num_particles=K, max_plate_nesting=nesting)
    elbo.loss_and_grads(model, guide, x)
    traced, steps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        elbo._get_trace(model, guide, (x,), {})
        traced.append(time.perf_counter() - start)
        start = time.perf_counter()
        elbo.loss_and_grads(model, guide, x)
        steps.append(time.perf_counter() - start)
    print(f"chain T=50 K={K}: Pyro's tracing {1e3 * statistics.median(traced):.1f} ms of a "
          f"{1e3 * statistics.median(steps):.1f} ms step", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--Ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    parser.add_argument("--split", action="store_true",
                        help="also time, for chain T=50 at the first K, Pyro's tracing alone against a whole step")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    if args.split:
        split(args.Ks[0], args.repeats)
    rows = []
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, float32, medians of {args.repeats} interleaved steps")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in CASES:
            for K in args.Ks:
                row = measure(name, K, args.repeats)
                row["threads"] = threads
                rows.append(row)
                print(f"threads={threads} {name:<14} K={K:<4} ours {row['ours_ms']:8.2f} ms  "
                      f"pyro {row['pyro_ms']:8.2f} ms  pyro/ours {row['pyro_over_ours']:5.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
