"""VI, DReGs, MP-RWS and QEM on a real hierarchical data set: ELBO and held-out predictive log-likelihood.

For each method, K and seed, ``fit`` runs ``--steps`` steps; every ``--eval-every`` steps the held-out predictive
log-likelihood (`tmcgraph.learn.predictive_log_likelihood`, ``--samples`` posterior samples) is measured outside
the timed part.  Printed, averaged over the seeds (with their standard error when there are several): the ELBO
(``log P_TMC`` averaged over the last ``--tail`` steps), the predictive log-likelihood (averaged over the
evaluations in the last ``--tail`` steps), and the median seconds per step; with ``--reference`` (a NUTS run of
`benchmarks/nuts_reference.py`) the fitted posterior's means against NUTS's, as the root mean square of their
difference in NUTS standard deviations over every latent element.  With ``--paper`` (the numbers
`benchmarks/qem_paper_figure.py` read from the QEM paper's figure) the paper's numbers for the same method and
K stand beside ours where its panel is of the same model (`PAPER_MODELS`: bus breakdown with
``--option latent_delay=true``, occupancy), and its curves are drawn dashed in the figure.

With ``--json`` the whole curves (against steps and against cumulative seconds) and every run's fitted
posterior means, written after every run: a run interrupted and started again with the same ``--json`` and
settings skips the runs already there.  ``--rescore FILE [FILE ...]`` reports saved runs (merged), against
other ``--reference`` files too, and redraws ``--figure``, running nothing.  With ``--figure`` one figure of
both curves per method and K (the first seed).

The latents the papers draw jointly share one sample index (`tmcgraph.datasets.Dataset.groups`) unless
``--no-groups``.

Run: python benchmarks/hierarchical.py --dataset radon --Ks 3 10 --steps 300 [--threads 1] [--json F] [--figure F]
     the QEM paper's settings: --Ks 30 --steps 250 --seeds 0 1 2 3 4 --samples 100 --eval-every 10
                               --lr qem=0.1 rws=0.03 vi=0.03 dregs=0.03 --paper benchmarks/results/qem_paper_figure.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from _util import standardised_errors  # benchmarks/, the script's directory

from tmcgraph.arguments import output_file
from tmcgraph.learn import METHODS, fit, predictive_log_likelihood

LRS = {"vi": 0.05, "dregs": 0.05, "rws": 0.05, "qem": 0.1}
#: the data sets whose QEM-paper panels are of our model, with the load options that give the figure's model
#: (its radon panel is of an older radon model and data: docs/learning.md)
PAPER_MODELS = {"bus_breakdown": {"latent_delay": True}, "occupancy": {}}


def fitted_means(estimator, data, draws: int) -> Dict[str, List]:
    """Each sampled latent's posterior mean under the fitted model: the average of ``draws`` TMC draws'
    `TMC.moments` (enumerated latents have no NUTS reference and are left out)."""
    sampled = {n: None for n in estimator.model.latents() if not estimator.model.sites[n].enumerate}
    with torch.no_grad():
        means = [estimator.moments(data, sampled) for _ in range(draws)]
    return {name: torch.stack([m[name] for m in means]).mean(0).tolist() for name in sampled}


def moment_error(means: Mapping[str, List], reference: Dict) -> float:
    """Root mean square over every latent element of ``(E_TMC[z] - E_NUTS[z]) / sd_NUTS[z]``."""
    return float(torch.cat(list(standardised_errors(means, reference).values())).pow(2).mean().sqrt())


def mean_and_error(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """The mean of ``values`` and its standard error (``None`` for a single value)."""
    if len(values) < 2:
        return float(values[0]), None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def _fmt(value: Tuple[float, Optional[float]], digits: int = 2) -> str:
    mean, err = value
    return f"{mean:.{digits}f}" + ("" if err is None else f" +- {err:.{digits}f}")


def paper_of(paper: Optional[Dict], dataset: str, load_options: Mapping[str, object]) -> Optional[Dict]:
    """``paper`` where its figure is of this data set's model with these load options (`PAPER_MODELS`), else None."""
    return paper if PAPER_MODELS.get(dataset) == dict(load_options) else None


def summarise(runs: List[Dict], tail: int, steps: int, references: Mapping[str, Dict],
              paper: Optional[Dict], dataset: str) -> List[Dict]:
    """One row per (K, method): the seeds' mean (and standard error) of each measure, and ``paper``'s beside it
    (give it through `paper_of`)."""
    rows = []
    for K, method in dict.fromkeys((r["K"], r["method"]) for r in runs):
        group = [r for r in runs if r["K"] == K and r["method"] == method]
        row = {"K": K, "method": method, "lr": group[0]["lr"], "seeds": [r["seed"] for r in group],
               "elbo": mean_and_error([statistics.fmean(r["elbo"][-tail:]) for r in group]),
               "predictive_ll": mean_and_error([statistics.fmean(p for s, _, p in r["predictive"] if s > steps - tail)
                                                for r in group]),
               "ms_per_step": 1e3 * statistics.median(s for r in group for s in r["seconds"])}
        for label, reference in references.items():
            row[f"mean_error_vs_{label}"] = mean_and_error([moment_error(r["posterior_mean"], reference)
                                                            for r in group])
        theirs = (paper or {}).get("curves", {}).get(dataset, {})
        if theirs.get("K") == K:
            for metric in ("elbo", "predictive_ll"):
                if method in theirs.get(metric, {}):
                    c = theirs[metric][method]
                    row[f"paper_{metric}"] = (c[f"mean_last_{tail}"] if f"mean_last_{tail}" in c else None,
                                              c["final"], c["final_stderr"])
            seconds = (paper or {}).get("seconds_per_iteration", {}).get(dataset, {}).get(method, {}).get(str(K))
            if seconds is not None:
                row["paper_ms_per_step"] = 1e3 * seconds
        rows.append(row)
    return rows


def print_rows(rows: List[Dict], markdown: bool = False) -> None:
    """The summary table, one line per (K, method); ``markdown``: as a Markdown table (docs/learning.md)."""
    if not rows:
        return
    errors = [k for k in rows[0] if k.startswith("mean_error_vs_")]
    has_paper = any(f"paper_{m}" in row for row in rows for m in ("elbo", "predictive_ll"))

    def paper(row: Dict, metric: str) -> str:
        if f"paper_{metric}" not in row:
            return "-"
        tail_mean, final, err = row[f"paper_{metric}"]
        return f"{final:.2f} +- {err:.2f}" + ("" if tail_mean is None else f" (last 50: {tail_mean:.2f})")

    if markdown:
        head = ["K", "method", "lr", "seeds", "ELBO", "predictive ll", "ms / step"]
        head += [f"mean error vs {k[len('mean_error_vs_'):]}" for k in errors]
        if has_paper:
            head += ["paper ELBO", "paper predictive ll", "paper ms / step (GPU)"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    for row in rows:
        cells = [str(row["K"]), row["method"], f"{row['lr']:g}", str(len(row["seeds"])), _fmt(row["elbo"]),
                 _fmt(row["predictive_ll"]), f"{row['ms_per_step']:.1f}"] + [_fmt(row[k], 3) for k in errors]
        if has_paper:
            cells += [paper(row, "elbo"), paper(row, "predictive_ll"),
                      f"{row['paper_ms_per_step']:.1f}" if "paper_ms_per_step" in row else "-"]
        if markdown:
            print("| " + " | ".join(cells) + " |")
            continue
        line = (f"K={cells[0]:<4s} {cells[1]:<6s} lr {cells[2]:<5s} ELBO {cells[4]:>18s}   "
                f"predictive ll {cells[5]:>18s}   {cells[6]:>7s} ms/step")
        line += "".join(f"   mean error vs {k[len('mean_error_vs_'):]} {c}" for k, c in zip(errors, cells[7:]))
        if has_paper:
            line += f"   | paper: ELBO {cells[-3]}, predictive ll {cells[-2]}, {cells[-1]} ms/step (GPU)"
        print(line)


def plot(runs: List[Dict], name: str, path: str, paper: Optional[Dict] = None) -> None:
    """One figure of a data set's runs (each method and K's first seed): ELBO and held-out predictive
    log-likelihood, against steps and seconds; the paper's curves (``paper``) dashed against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colours: Dict[str, str] = {}
    for run in runs:
        if run.get("seed", 0) != runs[0].get("seed", 0):
            continue
        label = f"{run['method']} K={run['K']}"
        seconds = torch.tensor(run["seconds"]).cumsum(0).tolist()
        axes[0, 0].plot(range(1, len(run["elbo"]) + 1), run["elbo"], label=label, lw=0.8)
        axes[0, 1].plot(seconds, run["elbo"], label=label, lw=0.8)
        steps, secs, pll = zip(*run["predictive"])
        axes[1, 0].plot(steps, pll, marker="o", label=label)
        lines = axes[1, 1].plot(secs, pll, marker="o", label=label)
        colours.setdefault(run["method"], lines[0].get_color())
    theirs = (paper or {}).get("curves", {}).get(name, {})
    for row, metric in enumerate(("elbo", "predictive_ll")):
        for method, c in theirs.get(metric, {}).items():
            axes[row, 0].plot(range(1, len(c["curve"]) + 1), c["curve"], ls="--", lw=1, color=colours.get(method),
                              label=f"QEM paper: {method} K={theirs['K']} (5 runs, smoothed)")
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
    parser.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE",
                        help="keyword arguments of the data set's load (JSON values), e.g. latent_delay=true")
    parser.add_argument("--no-groups", action="store_true", help="one index per latent, not the papers' groups")
    parser.add_argument("--reference", nargs="+", default=[],
                        help="benchmarks/nuts_reference.py JSON files: report the posterior means' error against each")
    parser.add_argument("--paper", default=None, help="benchmarks/qem_paper_figure.py's JSON: the paper's numbers")
    parser.add_argument("--rescore", nargs="+", default=None,
                        help="--json files of this script (one data set): report them, redraw --figure, run nothing")
    parser.add_argument("--moment-draws", type=int, default=10,
                        help="TMC draws averaged for each run's fitted posterior means")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--Ks", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None, help="posterior samples per pass (memory)")
    parser.add_argument("--tail", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help=f"step sizes other than the defaults {LRS}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    parser.add_argument("--json", type=output_file, default=None)
    parser.add_argument("--figure", type=output_file, default=None)
    args = parser.parse_args(argv)
    lrs = dict(LRS)
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            parser.error(f"--lr {item!r}: expected METHOD=LR with METHOD one of {METHODS}")
        lrs[method] = float(value)
    references = {}
    for path in args.reference:
        with open(path) as f:
            references[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    paper = None
    if args.paper:
        with open(args.paper) as f:
            paper = json.load(f)
    if args.rescore:
        saved = []
        for path in args.rescore:
            with open(path) as f:
                saved.append(json.load(f))
        settings = {(d["dataset"], json.dumps(d.get("load_options", {}), sort_keys=True), d["steps"], d["tail"])
                    for d in saved}
        if len(settings) != 1:
            parser.error(f"--rescore: the files are of different data sets or settings {sorted(settings)}")
        dataset, load_options, steps, tail = settings.pop()
        runs = [r for d in saved for r in d["runs"]]
        keys = [(r["K"], r["method"], r["seed"], r["lr"]) for r in runs]
        if len(set(keys)) != len(keys):
            parser.error("--rescore: a run (K, method, seed, lr) appears twice")
        paper = paper_of(paper, dataset, json.loads(load_options))
        print_rows(summarise(runs, tail, steps, references, paper, dataset), args.markdown)
        if args.figure:
            plot(runs, dataset, args.figure, paper)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    module = importlib.import_module(f"tmcgraph.datasets.{args.dataset}")
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    ds = module.load(args.folder, **options) if args.folder else module.load(**options)
    compile_options = {} if args.no_groups else {"groups": ds.groups}
    model = ds.model()
    header = {"dataset": ds.name, "load_options": options, "steps": args.steps, "tail": args.tail,
              "samples": args.samples, "eval_every": args.eval_every, "groups": not args.no_groups}
    runs: List[Dict] = []
    if args.json and os.path.exists(args.json):  # resume: keep the runs of the same settings already done
        with open(args.json) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in header} != header:
            parser.error(f"--json {args.json} holds runs of other settings ({ {k: saved.get(k) for k in header} }); "
                         "remove it or give another file")
        runs = saved["runs"]
        print(f"resuming: {len(runs)} runs already in {args.json}")
    print(f"{ds.name}: {args.steps} steps, seeds {args.seeds}, torch threads {torch.get_num_threads()}, "
          f"groups {compile_options.get('groups', ())}, {args.samples} samples for the predictive log-likelihood"
          + (f", load options {options}" if options else ""))
    for K, method, seed in ((K, m, s) for K in args.Ks for m in args.methods for s in args.seeds):
        if any((r["K"], r["method"], r["seed"], r["lr"]) == (K, method, seed, lrs[method]) for r in runs):
            continue
        curve: List = []

        def evaluate(step, result, curve=curve, seed=seed):
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                with torch.random.fork_rng():  # evaluating leaves the training draws as they would be without it
                    torch.manual_seed(1_000_003 * seed + step)
                    pll = predictive_log_likelihood(result.estimator, ds.train, ds.test_log_likelihood,
                                                    num_samples=args.samples, latents=ds.test_latents,
                                                    chunk_size=args.chunk_size)
                curve.append((step + 1, sum(result.history["seconds"]), float(pll)))

        r = fit(model, ds.train, method=method, K=K, steps=args.steps, lr=lrs[method], seed=seed,
                progress=False, callback=evaluate, estimator_options=compile_options)
        means = fitted_means(r.estimator, ds.train, args.moment_draws)
        runs.append({"K": K, "method": method, "lr": lrs[method], "seed": seed,
                     "elbo": [round(v, 3) for v in r.history["elbo"]],
                     "seconds": [round(v, 6) for v in r.history["seconds"]],
                     "predictive": [(s, round(t, 6), round(p, 3)) for s, t, p in curve],
                     "posterior_mean": {n: torch.tensor(v).double().mul(1e5).round().div(1e5).tolist()
                                        for n, v in means.items()}})
        print(f"  done: K={K} {method} seed {seed}: ELBO {statistics.fmean(r.history['elbo'][-args.tail:]):.2f}, "
              f"predictive ll {curve[-1][2]:.2f}", flush=True)
        if args.json:  # after every run, atomically: an interrupted benchmark keeps what it finished
            with open(args.json + ".tmp", "w") as f:
                json.dump({**header, "runs": runs}, f)
            os.replace(args.json + ".tmp", args.json)
    paper = paper_of(paper, ds.name, options)
    print_rows(summarise(runs, args.tail, args.steps, references, paper, ds.name), args.markdown)
    if args.figure:
        plot(runs, ds.name, args.figure, paper)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
