"""VI, DReGs, MP-RWS and QEM on a real hierarchical data set: ELBO and held-out predictive log-likelihood.

For each method and K, ``fit`` runs ``--steps`` steps from the same seed; every ``--eval-every`` steps the
held-out predictive log-likelihood (`tmcgraph.learn.predictive_log_likelihood`, ``--samples`` posterior samples)
is measured outside the timed part.  Printed: the ELBO (``log P_TMC`` averaged over the last ``--tail`` steps),
the last predictive log-likelihood, and the median seconds per step; with ``--reference`` (a NUTS run of
`benchmarks/nuts_reference.py`) the fitted posterior's means against NUTS's, as the root mean square of their
difference in NUTS standard deviations over every latent element.  With ``--json`` the whole curves (against
steps and against cumulative seconds), with ``--figure`` one figure of both curves per method and K.

The latents the papers draw jointly share one sample index (`tmcgraph.datasets.Dataset.groups`) unless
``--no-groups``.

Run: python benchmarks/hierarchical.py --dataset radon --Ks 3 10 --steps 300 [--threads 1] [--json F] [--figure F]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from typing import Dict, List

import torch

from tmcgraph.arguments import output_file
from tmcgraph.learn import METHODS, fit, predictive_log_likelihood

LRS = {"vi": 0.05, "dregs": 0.05, "rws": 0.05, "qem": 0.1}


def moment_error(estimator, data, reference: Dict, draws: int) -> float:
    """Root mean square over every latent element of ``(E_TMC[z] - E_NUTS[z]) / sd_NUTS[z]``.

    ``E_TMC`` averages the posterior means of ``draws`` TMC draws (`tmcgraph.TMC.moments`) of the fitted model.
    """
    with torch.no_grad():
        means = [estimator.moments(data) for _ in range(draws)]
    errors = []
    for name, ref in reference["mean"].items():
        got = torch.stack([m[name] for m in means]).mean(0)
        sd = torch.tensor(reference["var"][name]).clamp_min(1e-12).sqrt()
        errors.append(((got - torch.tensor(ref)) / sd).flatten())
    return float(torch.cat(errors).pow(2).mean().sqrt())


def plot(runs: List[Dict], name: str, path: str) -> None:
    """One figure of a data set's runs: ELBO and held-out predictive log-likelihood, against steps and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run in runs:
        label = f"{run['method']} K={run['K']}"
        seconds = torch.tensor(run["seconds"]).cumsum(0).tolist()
        axes[0, 0].plot(range(1, len(run["elbo"]) + 1), run["elbo"], label=label, lw=0.8)
        axes[0, 1].plot(seconds, run["elbo"], label=label, lw=0.8)
        steps, secs, pll = zip(*run["predictive"])
        axes[1, 0].plot(steps, pll, marker="o", label=label)
        axes[1, 1].plot(secs, pll, marker="o", label=label)
    for ax in axes[0]:
        ax.set_ylabel("ELBO (log P_TMC of each step's draw)")
    for ax in axes[1]:
        ax.set_ylabel("held-out predictive log-likelihood")
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
    for ax in axes[:, 1]:
        ax.set_xlabel("seconds (cumulative, evaluation excluded)")
    axes[0, 0].set_title(name)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="radon")
    parser.add_argument("--folder", default=None, help="the data folder of a data set not shipped (chimpanzees)")
    parser.add_argument("--no-groups", action="store_true", help="one index per latent, not the papers' groups")
    parser.add_argument("--reference", default=None,
                        help="a benchmarks/nuts_reference.py JSON: report the posterior means' error against it")
    parser.add_argument("--moment-draws", type=int, default=10,
                        help="TMC draws averaged for the fitted posterior's means (with --reference)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--Ks", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None, help="posterior samples per pass (memory)")
    parser.add_argument("--tail", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--figure", type=output_file, default=None)
    parser.add_argument("--plot-only", default=None, help="redraw --figure from this --json file, run nothing")
    args = parser.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            saved = json.load(f)
        plot(saved["runs"], saved["dataset"], args.figure)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    module = importlib.import_module(f"tmcgraph.datasets.{args.dataset}")
    ds = module.load(args.folder) if args.folder else module.load()
    options = {} if args.no_groups else {"groups": ds.groups}
    model = ds.model()
    reference = None
    if args.reference:
        with open(args.reference) as f:
            reference = json.load(f)
    runs: List[Dict] = []
    print(f"{ds.name}: {args.steps} steps, seed {args.seed}, torch threads {torch.get_num_threads()}, "
          f"groups {options.get('groups', ())}")
    for K in args.Ks:
        for method in args.methods:
            curve: List = []

            def evaluate(step, result, curve=curve):
                if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                    pll = predictive_log_likelihood(result.estimator, ds.train, ds.test_log_likelihood,
                                                    num_samples=args.samples, latents=ds.test_latents,
                                                    chunk_size=args.chunk_size)
                    curve.append((step + 1, sum(result.history["seconds"]), float(pll)))

            r = fit(model, ds.train, method=method, K=K, steps=args.steps, lr=LRS[method], seed=args.seed,
                    progress=False, callback=evaluate, estimator_options=options)
            elbo = r.history["elbo"]
            tail = statistics.fmean(elbo[-args.tail:])
            per_step = statistics.median(r.history["seconds"])
            error = None if reference is None else moment_error(r.estimator, ds.train, reference, args.moment_draws)
            print(f"K={K:<4d} {method:<6s} ELBO {tail:10.2f}   predictive ll {curve[-1][2]:10.2f}   "
                  f"{1e3 * per_step:7.1f} ms/step" + ("" if error is None else f"   mean error vs NUTS {error:.3f}"))
            runs.append({"K": K, "method": method, "lr": LRS[method], "elbo": elbo, "seconds": r.history["seconds"],
                         "predictive": curve, "mean_error_vs_nuts": error})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": ds.name, "steps": args.steps, "seed": args.seed, "runs": runs}, f)
    if args.figure:
        plot(runs, ds.name, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
