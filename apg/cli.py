"""The ``apg`` command line: ``apg train MODEL`` and ``apg evaluate MODEL`` for every registered model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Dict, List, Optional

from tmcgraph.arguments import HelpFormatter, non_negative_int, output_dir, positive_float, positive_int

from . import models
from .errors import APGError
from .resampling import SCHEMES

__all__ = ["build_parser", "main"]

EXAMPLES = """examples:
  apg evaluate gmm                                      Table 1a from the shipped checkpoints
  apg evaluate gmm --json --plots figs                  the same as JSON, with Figs. 1a and 2
  apg train gmm --method apg --out runs/gmm/apg         retrain the shipped APG checkpoint
  apg train gmm --method rws-mlp --out runs/gmm/rws-mlp
  apg evaluate dgmm                                     Table 1b (rings) from the shipped checkpoints
  torchrun --nproc-per-node 2 -m apg.cli train gmm --out runs/gmm/dp    data-parallel on 2 processes
Rerun an interrupted training command (Ctrl-C) to resume it."""


def _defaults_text(problem: models.Problem, key: str) -> str:
    by_method: Dict[str, List[str]] = {}
    for name, method in problem.methods.items():
        value = method.train_defaults.get(key)
        if value is not None:
            by_method.setdefault(str(value), []).append(name)
    if len(by_method) == 1 and sum(map(len, by_method.values())) == len(problem.methods):  # the same for all
        return next(iter(by_method))
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in by_method.items())


def _add_train(sub: argparse._SubParsersAction, problem: models.Problem) -> None:
    from .train import TrainConfig

    base = TrainConfig()
    p = sub.add_parser(problem.name, help=problem.description, description=f"Train {problem.description}. "
                       "Settings default to those of the method's shipped checkpoint.", formatter_class=HelpFormatter)
    methods = list(problem.methods)
    p.add_argument("--method", choices=methods, default=methods[0],
                   help="; ".join(f"{m.name}: {m.description}" for m in problem.methods.values()))
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR",
                   help="run directory (config.json, checkpoint.pt, metrics.csv, proposals.pt)")

    def method_default(flag: str, key: str, kind, help_text: str, metavar: str) -> None:
        text = _defaults_text(problem, key) or str(getattr(base, key))
        p.add_argument(flag, type=kind, default=None, metavar=metavar, help=f"{help_text} (default: {text})")

    method_default("--iterations", "iterations", positive_int, "training iterations", "N")
    method_default("--batch", "batch_size", positive_int, "datasets per batch", "B")
    method_default("--particles", "num_particles", positive_int, "particles L", "L")
    method_default("--sweeps", "num_sweeps", positive_int, "sweeps K (1 for the one-shot RWS methods)", "K")
    method_default("--lr", "lr", positive_float, "initial Adam learning rate", "LR")
    method_default("--lr-final", "lr_final", positive_float, "learning rate at the end (exponential decay)", "LR")
    method_default("--datasets", "num_datasets", positive_int, "training datasets", "N")
    p.add_argument("--seed", type=int, default=base.seed, help="seed of the data, the weights and the sampler")
    method_default("--log-every", "log_every", positive_int, "log metrics every N iterations", "N")
    method_default("--checkpoint-every", "checkpoint_every", positive_int, "write a checkpoint every N iterations",
                   "N")
    method_default("--threads", "threads", non_negative_int, "torch threads (0: torch's default)", "T")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="where to train: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--streams", type=positive_int, default=None, metavar="S",
                   help="random streams: each batch is split into S slices with a generator each (default 1, or "
                        "the number of processes under torchrun, which trains data-parallel: a multiple of it)")
    p.add_argument("--resampling", choices=list(SCHEMES), default=None,
                   help=f"resampling before every block update (default: {base.resampling}; the official code's "
                        "samplers resample systematically, multinomial is the textbook scheme)")
    p.add_argument("--compile", action="store_true",
                   help="run each iteration's sampler and loss as a torch.compile'd program (one stream; the "
                        "first iterations compile, for minutes on a CPU; docs/performance.md has the speed-up)")
    inits = _defaults_text(problem, "init")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start from trained networks (a proposals file, or shipped:NAME for apg/checkpoints/NAME.pt)"
                        + (f" (default: {inits}; none for the other methods)" if inits else ""))
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the last metrics as JSON only")
    problem.add_train_arguments(p)
    p.set_defaults(fn=_train, model=problem.name)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    settings = {"iterations": args.iterations, "num_particles": args.particles, "num_sweeps": args.sweeps,
                "lr": args.lr, "lr_final": args.lr_final, "threads": args.threads, "init": args.init,
                "batch_size": args.batch, "num_datasets": args.datasets, "log_every": args.log_every,
                "checkpoint_every": args.checkpoint_every, "device": args.device,
                "compile": True if args.compile else None, "resampling": args.resampling}
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    settings["streams"] = args.streams if args.streams is not None else world
    settings = {k: v for k, v in settings.items() if v is not None}
    cfg = TrainConfig.for_method(args.model, args.method, seed=args.seed, **settings)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        last = train(args.out, cfg, resume=not args.restart, progress=not args.quiet,
                     problem=models.get(args.model).from_arguments(args))
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted; checkpoint written to {args.out}/checkpoint.pt (run the same command to resume)",
                  file=sys.stderr)
        return 130
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(last))
    else:
        print(f"trained {args.model} {args.method}: {args.out}/proposals.pt")
        logged = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        print(f"last metrics: {logged or 'none logged (fewer iterations than --log-every)'}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction, problem: models.Problem) -> None:
    p = sub.add_parser(problem.name, help=problem.description, description=f"Evaluate {problem.description}.",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help=f"directory with run directories ({', '.join(problem.methods)}) or "
                        f"{problem.name}-METHOD.pt files (default: the checkpoints shipped in the package)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plots", type=output_dir, default=None, metavar="DIR",
                   help="write the figures here (needs matplotlib)")
    p.add_argument("--threads", type=non_negative_int, default=0, metavar="T", help="torch threads (0: default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    problem.add_evaluate_arguments(p)
    p.set_defaults(fn=_evaluate, model=problem.name)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    generic = {"fn", "model", "command", "checkpoint", "json", "plots", "threads", "quiet"}
    options = {k: v for k, v in vars(args).items() if k not in generic}
    out = evaluate(args.model, checkpoint=args.checkpoint, options=options, plots=args.plots,
                   progress=not args.quiet)
    problem = models.get(args.model)
    print(json.dumps(out) if args.json else problem.format(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``apg`` argument parser (its subcommands and every model's options)."""
    from . import __version__

    p = argparse.ArgumentParser(prog="apg", description="Amortized population Gibbs samplers (Wu et al., ICML 2020) "
                                "built on tmcgraph.", epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"apg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model's proposals (rerun the same command to resume)",
                       description="Train a model's proposals. Choose the model:", formatter_class=HelpFormatter)
    ts = t.add_subparsers(dest="model_name", required=True, metavar="MODEL")
    e = sub.add_parser("evaluate", help="evaluate trained proposals (the paper's tables and figures)",
                       description="Evaluate trained proposals. Choose the model:", formatter_class=HelpFormatter)
    es = e.add_subparsers(dest="model_name", required=True, metavar="MODEL")
    for name in models.names():
        problem = models.get(name)
        _add_train(ts, problem)
        _add_evaluate(es, problem)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``apg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "plots", None) is not None and importlib.util.find_spec("matplotlib") is None:
        parser.exit(2, "apg: error: --plots needs matplotlib: pip install 'tmcgraph[plots]'\n")
    try:
        return int(args.fn(args))
    except (FileNotFoundError, APGError, ValueError) as err:  # bad settings or missing checkpoints: no traceback
        print(f"apg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
