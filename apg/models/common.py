"""Helpers the models' evaluations share: batching, option lookup, the common flags, table cells."""

from __future__ import annotations

import argparse
import csv
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from tmcgraph.arguments import positive_int
from tmcgraph.resampling import SCHEMES

__all__ = ["add_resampling_argument", "add_sampler_arguments", "cell", "chunks", "metrics_columns", "option",
           "resolve_device", "save_figure", "standard_error", "training_curves"]


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``size`` (bounds the memory of batched evaluations)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def option(options: Mapping[str, Any], key: str, default: Any) -> Any:
    """``options[key]`` unless it is missing or ``None``."""
    value = options.get(key)
    return default if value is None else value


def add_sampler_arguments(parser: argparse.ArgumentParser, *, datasets: int, seed: int, particles: int,
                          rws_particles: int, sweeps: Any, rws_rows: str = "rows") -> None:
    """The flags every model's ``apg evaluate`` takes.

    ``--datasets``, ``--seed``, ``--particles``, ``--rws-particles`` and ``--sweeps``, with these defaults.
    """
    parser.add_argument("--datasets", type=positive_int, default=datasets, metavar="N", help="held-out test datasets")
    parser.add_argument("--seed", type=int, default=seed, help="seed of the test datasets and of the sampler")
    parser.add_argument("--particles", type=positive_int, default=particles, metavar="L",
                        help="particles L of the APG rows")
    parser.add_argument("--rws-particles", type=positive_int, default=rws_particles, metavar="L",
                        help=f"particles L of the RWS {rws_rows}")
    parser.add_argument("--sweeps", type=positive_int, nargs="+", default=list(sweeps), metavar="K",
                        help="sweeps K of the APG rows")
    add_resampling_argument(parser)


def add_resampling_argument(parser: argparse.ArgumentParser) -> None:
    """``--resampling``: the scheme the evaluated samplers resample with before every block update."""
    parser.add_argument("--resampling", choices=list(SCHEMES), default="systematic",
                        help="resampling before every block update (multinomial: the textbook scheme, more "
                             "variance)")


def standard_error(t: torch.Tensor) -> float:
    """The standard error of the mean of ``t`` (e.g. over test datasets: a table cell's Monte Carlo error), 2 digits."""
    return float(f"{float(t.double().std() / t.numel() ** 0.5):.2g}") if t.numel() > 1 else float("nan")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``torch.device(name)``, or an `APGError` naming ``flag`` when it is not a device or has no CUDA behind it."""
    from ..errors import APGError

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise APGError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {name!r} ({flag})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise APGError(f"device {name!r}: this torch has no CUDA device available ({flag})")
    return dev


def cell(v: Optional[float], width: int = 9, digits: int = 3) -> str:
    """A right-aligned table cell: ``-`` for ``None``, scientific notation below ``10 ** -digits``."""
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width}.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:>{width}.1e}"


def metrics_columns(path: str) -> Tuple[List[int], Callable[[str], List[float]]]:
    """A training run's ``metrics.csv``.

    Its iterations and ``col(name)``, the column as floats (``nan`` where a row has no value, e.g. a metric logged by
    some methods only).
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def col(name: str) -> List[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    return [int(r["iteration"]) for r in rows], col


def save_figure(fig: Any, path: str) -> str:
    """Lay out, write (110 dpi) and close a matplotlib figure; returns ``path``."""
    from tmcgraph.plots import pyplot

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def training_curves(metrics: Dict[str, Optional[str]], path: str, ylabels: Sequence[str],
                    figsize: Tuple[float, float], draw: Callable[[Any, str, List[int], Callable[[str], List[float]]],
                                                                 None]) -> Optional[str]:
    """Training curves from the runs' metrics CSVs (``None`` when no run has one).

    One panel per entry of ``ylabels``; ``draw(axes, method, iterations, col)`` plots one run; the panels get the
    iteration axis and a legend; the figure is written to ``path``.
    """
    from tmcgraph.plots import pyplot

    runs = {m: p for m, p in metrics.items() if p is not None}
    if not runs:
        return None
    fig, axes = pyplot().subplots(1, len(ylabels), figsize=figsize)
    for m, p in runs.items():
        it, col = metrics_columns(p)
        draw(axes, m, it, col)
    for ax, label in zip(axes, ylabels):
        ax.set_ylabel(label)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    return save_figure(fig, path)

