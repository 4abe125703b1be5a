"""One TMC objective step (sample, build factors, contract, backward): tmcgraph vs Pyro's TraceTMC_ELBO.

Models (float32), the same proposals in both systems:

* chain T: z_1 ~ N(0,1), z_t ~ N(0.9 z_{t-1}, 0.19), x_t ~ N(z_t, 1); factorised
  proposals z_t ~ N(loc_t, exp(log_scale_t)) with learnable parameters.
* family T: the same chain declared as one vectorised family (``Model.markov`` and
  ``Model.observe_each``): its functions are called once for all steps.
* plated: mu ~ N(0,1), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5^2), n < N; proposals
  mu ~ N(a, exp(b)), z_n ~ N(c_n, exp(d_n)).

For each model and K the two steps are timed interleaved (ours, Pyro, ours, ...),
median of ``--repeats``, per thread count.  For ours the forward is also split
into sampling + factor building ("trace") and the contraction, to check that the
first never costs more than the second at K >= 64.

    python benchmarks/model_step.py --threads 1 2 --repeats 7 --json benchmarks/results/model_step.json

Reports ratios (Pyro / ours, trace / contraction), measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _util import write_json  # benchmarks/, the script's directory
from torch.distributions import Normal

import tmcgraph
from tmcgraph.arguments import output_file


def chain(T):
    loc = torch.zeros(T, requires_grad=True)
    log_scale = torch.zeros(T, requires_grad=True)
    m = tmcgraph.Model()
    sd = math.sqrt(1 - 0.81)
    m.latent("z0", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc[0], log_scale[0].exp()))
    with m.batch_sites():  # the loops' functions broadcast: TMC evaluates each loop in one call
        for t in range(1, T):
            m.latent(f"z{t}", prior=lambda prev: Normal(0.9 * prev, sd),
                     proposal=lambda t=t: Normal(loc[t], log_scale[t].exp()), parents=[f"z{t - 1}"],
                     proposal_parents=[])
        for t in range(T):
            m.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
    x = torch.randn(T)
    data = {f"x{t}": x[t] for t in range(T)}
    return m, data, (loc, log_scale), x


def chain_family(T):
    """The chain of :func:`chain` declared as one vectorised family (``Model.markov``)."""
    loc = torch.zeros(T, requires_grad=True)
    log_scale = torch.zeros(T, requires_grad=True)
    sd = math.sqrt(1 - 0.81)
    m = tmcgraph.Model()
    m.markov("z", T, init=lambda: Normal(0.0, 1.0), transition=lambda prev: Normal(0.9 * prev, sd),
             proposal=lambda t: Normal(loc[t], log_scale[t].exp()))
    m.observe_each("x", "z", lambda z: Normal(z, 1.0))
    x = torch.randn(T)
    data = {f"x_{t}": x[t] for t in range(T)}
    return m, data, (loc, log_scale), x


def plated(N):
    a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    c, d = torch.zeros(N, requires_grad=True), torch.zeros(N, requires_grad=True)
    m = tmcgraph.Model()
    m.plate("N", N)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(a, b.exp()))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda: Normal(c, d.exp()), plates=["N"],
             proposal_parents=[])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    x = torch.randn(N)
    return m, {"x": x}, (a, b, c, d), x


def pyro_chain(T, K, params, x):
    import pyro
    import pyro.distributions as dist

    loc, log_scale = params
    sd = math.sqrt(1 - 0.81)

    def model():
        z = pyro.sample("z0", dist.Normal(0.0, 1.0))
        pyro.sample("x0", dist.Normal(z, 1.0), obs=x[0])
        for t in range(1, T):
            z = pyro.sample(f"z{t}", dist.Normal(0.9 * z, sd))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[t])

    def guide():
        for t in range(T):
            pyro.sample(f"z{t}", dist.Normal(loc[t], log_scale[t].exp()),
                        infer={"enumerate": "parallel", "num_samples": K, "expand": False})

    return model, guide, 0


def pyro_plated(N, K, params, x):
    import pyro
    import pyro.distributions as dist

    a, b, c, d = params

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("N", N, dim=-1):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide():
        pyro.sample("mu", dist.Normal(a, b.exp()), infer={"enumerate": "parallel", "num_samples": K,
                                                           "expand": False})
        with pyro.plate("N", N, dim=-1):
            pyro.sample("z", dist.Normal(c, d.exp()), infer={"enumerate": "parallel", "num_samples": K,
                                                              "expand": False})

    return model, guide, 1


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name, build, pyro_build, size, K, repeats, pyro_ok, with_compiled=False):
    from pyro.infer import TraceTMC_ELBO

    m, data, params, x = build(size)
    est = m.compile(K=K)
    est_compiled = m.compile(K=K, backend="compiled") if with_compiled else None

    def ours():
        loss = -est.log_marginal(data)
        loss.backward()

    def ours_compiled():
        loss = -est_compiled.log_marginal(data)
        loss.backward()

    def ours_split():
        with torch.no_grad():
            t0 = time.perf_counter()
            tr, plan, _ = est._trace(data)
            t1 = time.perf_counter()
            plan.log_sum(tr.factors)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    model, guide, nesting = pyro_build(size, K, params, x)
    elbo = TraceTMC_ELBO(max_plate_nesting=nesting)

    def theirs():
        elbo.differentiable_loss(model, guide).backward()

    ours()
    ours_split()
    if pyro_ok:
        theirs()
    if with_compiled:
        ours_compiled()  # the first evaluation of a data layout runs eagerly, with every check
    compile_seconds = timed(ours_compiled) if with_compiled else None  # the second compiles
    t_ours, t_pyro, t_trace, t_contract, t_compiled = [], [], [], [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        if with_compiled:
            t_compiled.append(timed(ours_compiled))
        a, b = ours_split()
        t_trace.append(a)
        t_contract.append(b)
        if pyro_ok:
            t_pyro.append(timed(theirs))
    med = statistics.median
    row = {"model": name, "size": size, "K": K, "ours_step": med(t_ours), "trace": med(t_trace),
           "contract": med(t_contract), "trace_over_contract": med(t_trace) / med(t_contract)}
    if pyro_ok:
        row["pyro_step"] = med(t_pyro)
        row["pyro_over_ours"] = med(t_pyro) / med(t_ours)
    if with_compiled:
        row["compiled_step"] = med(t_compiled)
        row["compile_seconds"] = compile_seconds
        if pyro_ok:
            row["pyro_over_compiled"] = med(t_pyro) / med(t_compiled)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--Ks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--compiled", action="store_true",
                        help="also time model.compile(backend='compiled'): the whole objective compiled")
    args = parser.parse_args()
    import pyro

    pyro.enable_validation(False)
    torch.manual_seed(0)
    cases = [("chain", chain, pyro_chain, 10), ("chain", chain, pyro_chain, 50),
             ("family", chain_family, pyro_chain, 10), ("family", chain_family, pyro_chain, 50),
             ("plated", plated, pyro_plated, 100)]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, build, pyro_build, size in cases:
            for K in args.Ks:
                row = run_case(name, build, pyro_build, size, K, args.repeats, pyro_ok=True,
                               with_compiled=args.compiled)
                row["threads"] = threads
                rows.append(row)
                compiled = ""
                if args.compiled:
                    compiled = (f"  pyro/compiled {row['pyro_over_compiled']:6.2f}x "
                                f"(compile {row['compile_seconds']:.1f} s)")
                print(f"threads={threads} {name:>6} size={size:<4} K={K:<4} ours {row['ours_step'] * 1e3:8.2f} ms  "
                      f"pyro {row['pyro_step'] * 1e3:8.2f} ms  pyro/ours {row['pyro_over_ours']:6.2f}x  "
                      f"trace/contract {row['trace_over_contract']:5.2f}{compiled}", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
