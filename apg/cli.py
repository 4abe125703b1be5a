"""``apg`` command line: ``apg train gmm`` and ``apg evaluate gmm``.

Examples::

    apg train gmm --method apg --out runs/gmm-apg            # the paper's batch 20, K=10, L=10
    apg train gmm --method rws-mlp --particles 100 --sweeps 1 --out runs/gmm-rws-mlp
    apg evaluate gmm                                         # the shipped checkpoints
    apg evaluate gmm --checkpoint runs --json --plots figs
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    sweeps = args.sweeps if args.sweeps is not None else (10 if args.method == "apg" else 1)
    cfg = TrainConfig(method=args.method, iterations=args.iterations, batch_size=args.batch,
                      num_particles=args.particles, num_sweeps=sweeps, lr=args.lr, lr_final=args.lr_final,
                      num_datasets=args.datasets, seed=args.seed, log_every=args.log_every,
                      checkpoint_every=args.checkpoint_every, threads=args.threads, init=args.init or "")
    try:
        last = train(args.out, cfg, resume=not args.restart, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; checkpoint written to {args.out}/checkpoint.pt (run the same command to resume)",
              file=sys.stderr)
        return 130
    print(json.dumps(last))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, format_table

    cfg = EvalConfig(num_datasets=args.datasets, seed=args.seed, apg_particles=args.particles,
                     rws_particles=args.rws_particles, sweeps=tuple(args.sweeps), threads=args.threads,
                     budget=args.budget, budget_sweeps=tuple(args.budget_sweeps))
    out = evaluate(args.checkpoint, cfg, plots=args.plots)
    if args.json:
        print(json.dumps(out))
    else:
        print(format_table(out))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="apg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train proposals (checkpoints; rerun the same command to resume)")
    t.add_argument("model", choices=["gmm"])
    t.add_argument("--method", choices=["apg", "rws-mlp", "rws-lstm"], default="apg")
    t.add_argument("--out", required=True, help="run directory (config, checkpoint, metrics.csv, proposals.pt)")
    t.add_argument("--iterations", type=int, default=40000)
    t.add_argument("--batch", type=int, default=20, help="datasets per batch (paper: 20)")
    t.add_argument("--particles", type=int, default=10, help="L (paper: 10)")
    t.add_argument("--sweeps", type=int, default=None, help="K (default 10 for apg, 1 for the RWS baselines)")
    t.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate")
    t.add_argument("--lr-final", type=float, default=1e-4, help="learning rate at the end (exponential decay)")
    t.add_argument("--datasets", type=int, default=20000, help="training datasets (paper: 20,000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--init", default=None, metavar="FILE",
                   help="start from trained networks of the same method (e.g. apg/checkpoints/gmm-apg.pt)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)

    e = sub.add_parser("evaluate", help="Table 1a (and Figs. 1a, 2 with --plots) on held-out datasets")
    e.add_argument("model", choices=["gmm"])
    e.add_argument("--checkpoint", default=None,
                   help="directory with apg/, rws-mlp/, rws-lstm/ run dirs or proposals files "
                        "(default: the checkpoints shipped in the package)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    e.add_argument("--plots", default=None, metavar="DIR", help="write fig1a.png and fig2.png here")
    e.add_argument("--datasets", type=int, default=100, help="held-out test datasets")
    e.add_argument("--seed", type=int, default=12345, help="seed of the test datasets and of the sampler")
    e.add_argument("--particles", type=int, default=100, help="L for the APG rows")
    e.add_argument("--rws-particles", type=int, default=1000, help="L for the RWS rows")
    e.add_argument("--sweeps", type=int, nargs="+", default=[5, 10, 15], help="K of the APG rows")
    e.add_argument("--budget", type=int, default=1000, help="K * L of the Fig. 2 analysis")
    e.add_argument("--budget-sweeps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100],
                   help="values of K in Fig. 2")
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(fn=_evaluate)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as err:  # bad settings or missing checkpoints: no traceback
        print(f"apg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
