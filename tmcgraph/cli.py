"""The ``tmcgraph`` command line.

* ``tmcgraph demo``: compile a factor graph, check it against brute force.
* ``tmcgraph treewidth``: appendix H of the TMC paper (TMC vs IWAE on a random
  sparse linear-Gaussian model; ``--sweep`` plots error and time against tree-width).
* ``tmcgraph gaussian``: Fig. 7 (TMC vs SMC vs IWAE vs Kalman ground truth on a
  linear-Gaussian chain, against K and against N).
* ``tmcgraph dregs``: the DReGs surrogate (appendix F): gradient SNR against K
  for the reparameterised gradient, the paper's eq. 60 and ours, and proposals
  trained with each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from .arguments import (
    HelpFormatter,
    at_least,
    list_of,
    output_file,
    positive_float,
    positive_int,
    probability,
)

# torch and the engine are imported by the commands that use them: `tmcgraph --help` loads neither
if TYPE_CHECKING:
    from .graph import FactorGraph

__all__ = ["build_parser", "demo", "demo_graph", "main"]


def demo_graph(*, num_data: int, num_theta: int, num_z: int, num_loop: int) -> FactorGraph:
    """The demo's graph: appendix A of the TMC paper in one model.

    A global latent theta with a local z_i per data point (Fig. 6: prior on theta,
    a likelihood factor per data point), plus a loop of three latents a-b-c that
    all depend on theta (a Fig. 5 style loopy factor graph).
    """
    from .graph import FactorGraph

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


def demo(*, seed: int = 0, scale: float = 3.0, num_data: int = 1000, K: int = 64) -> Dict[str, Any]:
    """The demo's numbers.

    A small graph against brute force, the same structure at scale, and a declared model's TMC / IWAE / SMC estimates
    and posterior mean against the closed form.
    """
    import torch

    from .testing import brute_force_log_sum, random_factors

    torch.manual_seed(seed)
    small = demo_graph(num_data=3, num_theta=4, num_z=3, num_loop=3)
    factors = random_factors(small, seed=seed, scale=scale)
    small_plan = small.compile()
    value = small_plan.log_sum(factors).item()
    oracle = brute_force_log_sum(small, factors).item()
    big = demo_graph(num_data=num_data, num_theta=K, num_z=K, num_loop=K)
    plan = big.compile()
    factors32 = random_factors(big, seed=seed, scale=scale, dtype=torch.float32)
    start = time.perf_counter()
    value32 = plan.log_sum(factors32).item()
    seconds = time.perf_counter() - start
    reference = plan.log_sum({k: v.double() for k, v in factors32.items()}).item()
    return {"small": {"plan": small_plan.describe(), "log_sum": value, "brute_force": oracle,
                      "treewidth": small_plan.treewidth},
            "large": {"N": num_data, "K": K, "plan": plan.describe(), "log_sum_float32": value32,
                      "log_sum_float64": reference, "seconds": seconds, "treewidth": plan.treewidth},
            "model": _demo_model(seed)}


def _demo_model(seed: int) -> Dict[str, Any]:
    """A declared model (global mu, local z_i, x_i): TMC, IWAE and SMC against the closed form."""
    import torch
    from torch.distributions import MultivariateNormal, Normal

    from .estimators import iwae, smc
    from .model import Model

    torch.manual_seed(seed)
    n = 20
    m = Model()
    m.plate("N", n)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 1.5))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.2), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    x = 0.7 + torch.randn(n) * 1.2
    cov = torch.ones(n, n, dtype=torch.float64) + 1.25 * torch.eye(n, dtype=torch.float64)
    exact = MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(x.double()).item()
    est = m.compile(K=64)
    with torch.no_grad():
        tmc = est.log_marginal({"x": x.expand(10, n)})
        iw = iwae(m, {"x": x.expand(10, n)}, 64)
        sm = smc(m, {"x": x.expand(10, n)}, 64)
        post = est.posterior({"x": x})
    estimates = {name: {"mean": v.mean().item(), "sd": v.std().item()}
                 for name, v in (("tmc", tmc), ("iwae", iw), ("smc", sm))}
    return {"N": n, "K": 64, "runs": 10, "exact": exact, "estimates": estimates,
            "posterior_mean_mu": post.mean("mu").item(), "exact_posterior_mean_mu": (x.sum() / (n + 1.25)).item()}


def _demo(args: argparse.Namespace) -> int:
    out = demo(seed=args.seed, scale=args.scale, num_data=args.num_data, K=args.K)
    small, large, model = out["small"], out["large"], out["model"]
    ok = (abs(small["log_sum"] - small["brute_force"]) < 1e-9 * max(1.0, abs(small["brute_force"]))
          and abs(model["estimates"]["tmc"]["mean"] - model["exact"]) < 1.0)
    out["ok"] = ok
    if args.json:
        print(json.dumps(out))
        return 0 if ok else 1
    print("== a small graph, checked against brute-force enumeration (float64) ==")
    print(small["plan"])
    print(f"\ncompiled log_sum    = {small['log_sum']:.12f}")
    print(f"brute force log_sum = {small['brute_force']:.12f}   "
          f"(|difference| = {abs(small['log_sum'] - small['brute_force']):.2e})")
    print(f"\n== the same structure at N={large['N']}, K={large['K']} (float32; brute force is out of reach) ==")
    print(large["plan"])
    print(f"\nlog_sum float32 = {large['log_sum_float32']:.6f} in {large['seconds'] * 1e3:.1f} ms; "
          f"float64 = {large['log_sum_float64']:.6f}")
    print(f"\n== a declared model: mu ~ N(0,1), z_i ~ N(mu,1), x_i ~ N(z_i,0.5^2), N={model['N']} "
          "(mixture proposal for z) ==")
    print(f"exact log p(x)            = {model['exact']:.3f}")
    labels = {"tmc": "TMC  K=64 per latent", "iwae": "IWAE K=64 joint", "smc": "SMC  K=64 particles"}
    for name, v in model["estimates"].items():
        print(f"{labels[name]:<25} = {v['mean']:.3f} +- {v['sd']:.3f} (mean +- sd of {model['runs']} runs)")
    print(f"posterior mean of mu: TMC {model['posterior_mean_mu']:.3f}, exact {model['exact_posterior_mean_mu']:.3f}")
    return 0 if ok else 1


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _treewidth(args: argparse.Namespace) -> int:
    from .experiments import treewidth_experiment

    _threads(args.threads)
    kw = dict(N=args.N, seed=args.seed, K=args.K, iwae_samples=args.iwae_samples, chunk_size=args.chunk_size,
              noise=args.noise)
    if not args.sweep:
        out = treewidth_experiment(p=args.p, progress=True, **kw)
        if args.json:
            print(json.dumps(out))
            return 0
        print(f"appendix H: N={out['N']} latents and observations, p={out['p']}, seed={out['seed']}, "
              f"{args.threads} thread(s)")
        print(f"  tree-width (min-fill/min-degree bound): {out['treewidth']}; most parents of one observation: "
              f"{out['max_parents']}")
        print(f"  exact log p(x)          = {out['exact']:.2f}")
        if out["tmc"] is None:
            print(f"  TMC skipped: an observation has {out['max_parents']} parents or the plan needs "
                  f"{out['tmc_flops']:.2e} FLOPs (too large at this K)")
        else:
            print(f"  TMC  K={out['K']:<10d}      = {out['tmc']:.2f}   ({out['tmc_seconds']:.2f} s, "
                  f"compile {out['compile_seconds']:.2f} s)   error {out['tmc'] - out['exact']:+.2f}")
        print(f"  IWAE {out['iwae_samples']:<10d} samples = {out['iwae']:.2f}   ({out['iwae_seconds']:.2f} s)   "
              f"error {out['iwae'] - out['exact']:+.2f}")
        return 0
    from tqdm.auto import tqdm

    rows = []
    for p in tqdm(args.ps or SWEEP_PS, desc="sweep"):
        rows.append(treewidth_experiment(p=p, **kw))
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'p':>6} {'tw':>3} {'exact':>9} {'TMC':>9} {'TMC s':>7} {'IWAE':>11} {'IWAE s':>7}")
        for r in rows:
            tmc = "skipped" if r["tmc"] is None else f"{r['tmc']:.2f}"
            tmc_s = "" if r["tmc"] is None else f"{r['tmc_seconds']:.2f}"
            print(f"{r['p']:>6} {r['treewidth']:>3} {r['exact']:>9.2f} {tmc:>9} {tmc_s:>7} {r['iwae']:>11.2f} "
                  f"{r['iwae_seconds']:>7.2f}")
    _maybe_plot("plot_sweep", rows, args)
    return 0


def _maybe_plot(draw: str, results, args: argparse.Namespace) -> None:
    """``tmcgraph.plots.<draw>(results, args.plot)`` when ``--plot`` was given."""
    if args.plot:
        from . import plots

        getattr(plots, draw)(results, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")


def _gaussian(args: argparse.Namespace) -> int:
    from .experiments import gaussian_experiment

    _threads(args.threads)
    out = gaussian_experiment(N=args.N, K=args.K, Ks=args.Ks, Ns=args.Ns, seed=args.seed, repeats=args.repeats,
                              progress=True)
    if args.json:
        print(json.dumps(out))
    else:
        for key, fixed in (("vs_K", f"N={args.N}"), ("vs_N", f"K={args.K}")):
            print(f"== {key} ({fixed}); estimates are means of {args.repeats} runs, times medians ==")
            print(f"{'N':>5} {'K':>5} {'exact':>10} {'TMC':>10} {'SMC':>10} {'IWAE':>10} "
                  f"{'TMC s':>8} {'SMC s':>8} {'IWAE s':>8}")
            for r in out[key]:
                print(f"{r['N']:>5} {r['K']:>5} {r['exact']:>10.2f} {r['tmc']:>10.2f} {r['smc']:>10.2f} "
                      f"{r['iwae']:>10.2f} {r['tmc_seconds']:>8.4f} {r['smc_seconds']:>8.4f} "
                      f"{r['iwae_seconds']:>8.4f}")
    _maybe_plot("plot_gaussian", out, args)
    return 0


def _dregs(args: argparse.Namespace) -> int:
    from .experiments import dregs_experiment

    _threads(args.threads)
    out = dregs_experiment(N=args.N, noise=args.noise, seed=args.seed, Ks=args.Ks, draws=args.draws, at=args.at,
                           K=args.K, steps=args.steps, batch=args.batch, lr=args.lr, eval_every=args.eval_every,
                           eval_draws=args.eval_draws, progress=True)
    if args.json:
        print(json.dumps(out))
    else:
        st = out["settings"]
        print(f"DReGs for TMC: mu ~ N(0,1), z_n ~ N(mu,1), x_n ~ N(z_n,{st['noise']}^2), N={st['N']}, "
              f"factorised Normal proposals; exact log p(x) = {out['exact']:.3f}")
        print(f"\n== gradient SNR |E g| / sd(g) over {st['draws']} draws, proposals {st['at']} of the way from the "
              "prior to the posterior marginals ==")
        print(f"{'K':>4} {'gradient':<16} {'mu loc':>8} {'mu logsd':>9} {'z loc':>8} {'z logsd':>8} {'|E g|':>9}")
        for r in out["snr"]:
            s = r["snr"]
            print(f"{r['K']:>4} {r['gradient']:<16} {s['mu_loc']:>8.3f} {s['mu_log_scale']:>9.3f} "
                  f"{s['z_loc']:>8.3f} {s['z_log_scale']:>8.3f} {r['mean_norm']:>9.4f}")
        print(f"\n== E[log P_TMC] at K={st['K']} ({st['eval_draws']} draws, +- standard error) after training the "
              f"proposals with each gradient (Adam, lr {st['lr']}, {st['batch']} draws per step) ==")
        steps = [c["step"] for c in next(iter(out["training"].values()))]
        print(f"{'gradient':<16}" + "".join(f"{'step ' + str(s):>16}" for s in steps))
        for name, curve in out["training"].items():
            print(f"{name:<16}" + "".join(f"{c['log_marginal']:>9.3f} +-{c['log_marginal_se']:.3f}" for c in curve))
    _maybe_plot("plot_dregs", out, args)
    return 0


#: the edge probabilities of ``tmcgraph treewidth --sweep``
SWEEP_PS = [0.004, 0.006, 0.008, 0.01, 0.012, 0.014, 0.016, 0.02]


_positive_ints = list_of(positive_int, "positive integers")
_probabilities = list_of(probability, "probabilities")


def build_parser() -> argparse.ArgumentParser:
    """The ``tmcgraph`` argument parser (its subcommands and their options)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="tmcgraph", description="Graph-compiled Tensor Monte Carlo for PyTorch "
                                     "(Aitchison, NeurIPS 2019): a demo and the paper's experiments.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"tmcgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.add_argument("--json", action="store_true", help="print the results as JSON only (progress on stderr)")
        return p

    demo = command("demo", "compile a small factor graph, check it against brute force, then scale it up")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the factor values")
    demo.add_argument("--scale", type=positive_float, default=3.0, help="std of the random log-factors")
    demo.add_argument("--num-data", type=positive_int, default=1000, metavar="N",
                      help="plate size N of the large graph")
    demo.add_argument("--K", type=positive_int, default=64, help="samples per latent in the large graph")
    demo.set_defaults(func=_demo)

    tw = command("treewidth", "appendix H: TMC vs IWAE on a random sparse linear-Gaussian model")
    tw.add_argument("--N", type=positive_int, default=100, help="number of latents and of observations")
    tw.add_argument("--p", type=probability, default=0.01, help="probability that C_ij = 1")
    tw.add_argument("--seed", type=int, default=1,
                    help="seed for C, the data and the samples (1: tree-width 3, at most 4 parents; "
                         "seed 0 draws an observation with 6 parents)")
    tw.add_argument("--K", type=positive_int, default=64, help="TMC samples per latent")
    tw.add_argument("--iwae-samples", type=positive_int, default=2**24, metavar="S", help="IWAE joint samples")
    tw.add_argument("--chunk-size", type=positive_int, default=2**18, metavar="S", help="IWAE samples per chunk")
    tw.add_argument("--noise", type=positive_float, default=0.1, help="observation noise std")
    tw.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: one CPU core as in the paper)")
    tw.add_argument("--sweep", action="store_true", help="vary p (and so the tree-width)")
    tw.add_argument("--ps", type=_probabilities, default=None, metavar="P,P,...",
                    help="with --sweep: the values of p (default " + ",".join(map(str, SWEEP_PS)) + ")")
    tw.add_argument("--plot", type=output_file, default=None, metavar="PNG",
                    help="with --sweep: write error and time against tree-width here (needs matplotlib)")
    tw.set_defaults(func=_treewidth)

    ga = command("gaussian", "Fig. 7: TMC vs SMC vs IWAE vs Kalman ground truth on a Gaussian chain")
    ga.add_argument("--N", type=positive_int, default=128, help="chain length of the sweep over K")
    ga.add_argument("--K", type=positive_int, default=128, help="samples of the sweep over N")
    ga.add_argument("--Ks", type=_positive_ints, default=None, metavar="K,K,...",
                    help="values of K (default 2,4,...,128)")
    ga.add_argument("--Ns", type=_positive_ints, default=None, metavar="N,N,...",
                    help="values of N (default 8,16,...,128)")
    ga.add_argument("--seed", type=int, default=0, help="seed for the data and the samples")
    ga.add_argument("--repeats", type=positive_int, default=3, help="runs per point")
    ga.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    ga.add_argument("--plot", type=output_file, default=None, metavar="PNG",
                    help="write the four panels of Fig. 7 here (needs matplotlib)")
    ga.set_defaults(func=_gaussian)

    dr = command("dregs", "DReGs for TMC: gradient SNR against K, and proposals trained with each gradient")
    dr.add_argument("--N", type=positive_int, default=8, help="plate size")
    dr.add_argument("--noise", type=positive_float, default=0.5, help="observation noise std")
    dr.add_argument("--seed", type=int, default=0, help="seed for the data and the samples")
    dr.add_argument("--Ks", type=_positive_ints, default=None, metavar="K,K,...",
                    help="values of K for the SNR (default 1,2,4,...,64)")
    dr.add_argument("--draws", type=at_least(2), default=2000,
                    help="gradients drawn per SNR point (at least 2: the SNR needs a standard deviation)")
    dr.add_argument("--at", type=probability, default=0.5,
                    help="where the SNR is measured: 0 = proposals at the prior, 1 = at the posterior marginals")
    dr.add_argument("--K", type=positive_int, default=8, help="samples per latent for training")
    dr.add_argument("--steps", type=positive_int, default=600, help="Adam steps")
    dr.add_argument("--batch", type=positive_int, default=16, help="draws averaged per step")
    dr.add_argument("--lr", type=positive_float, default=0.02, help="Adam learning rate")
    dr.add_argument("--eval-every", type=positive_int, default=100, help="evaluate every this many steps")
    dr.add_argument("--eval-draws", type=at_least(2), default=2000,
                    help="draws per evaluation (at least 2: each mean comes with its standard error)")
    dr.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    dr.add_argument("--plot", type=output_file, default=None, metavar="PNG",
                    help="write the SNR and training panels here (needs matplotlib)")
    dr.set_defaults(func=_dregs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tmcgraph`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "treewidth" and args.plot and not args.sweep:
        parser.error("--plot draws the tree-width sweep: add --sweep (or drop --plot)")
    if args.command == "treewidth" and not args.sweep and args.ps is not None:
        parser.error("--ps gives the values of p for --sweep: add --sweep (or use --p for one value)")
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install 'tmcgraph[plots]'")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
