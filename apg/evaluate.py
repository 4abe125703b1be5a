"""The generic evaluation driver: find a model's checkpoints, then let the model evaluate them.

Checkpoints of model ``NAME`` and method ``M`` are looked up in a directory as
``NAME-M.pt`` (a proposals file, as shipped in ``apg/checkpoints``), or as a
run directory ``M/proposals.pt`` (finished) or ``M/checkpoint.pt``
(unfinished); training curves as ``NAME-M.metrics.csv`` or ``M/metrics.csv``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from . import models
from .errors import APGError
from .trained import load_proposals

__all__ = ["SHIPPED", "evaluate", "find_checkpoint", "find_metrics"]

#: the checkpoints shipped with the package
SHIPPED = os.path.join(os.path.dirname(__file__), "checkpoints")


def find_checkpoint(directory: Optional[str], model: str, method: str) -> str:
    """The proposals file of ``model``'s ``method`` in ``directory`` (default: the shipped checkpoints)."""
    directory = SHIPPED if directory is None else directory
    candidates = [os.path.join(directory, f"{model}-{method}.pt"), os.path.join(directory, method, "proposals.pt"),
                  os.path.join(directory, method, "checkpoint.pt")]
    for c in candidates:
        if os.path.exists(c):
            return c
    raise APGError(f"no checkpoint for {method!r} in {directory}: looked for {candidates} (--checkpoint)")


def find_metrics(directory: Optional[str], model: str, method: str) -> Optional[str]:
    """The training curves of ``model``'s ``method`` (``None`` if there are none)."""
    directory = SHIPPED if directory is None else directory
    for c in (os.path.join(directory, f"{model}-{method}.metrics.csv"), os.path.join(directory, method, "metrics.csv")):
        if os.path.exists(c):
            return c
    return None


def evaluate(model: str, *, checkpoint: Optional[str] = None, options: Optional[Mapping[str, Any]] = None,
             plots: Optional[str] = None, progress: bool = False) -> Dict[str, Any]:
    """Evaluate every method of ``model`` from the checkpoints in ``checkpoint``.

    Args:
        model: a registered model name.
        checkpoint: directory of checkpoints (``None``: the shipped ones).
        options: the model's evaluation options (see ``apg evaluate NAME --help``).
        plots: directory for the model's figures.
        progress: a progress bar on stderr.

    Returns:
        the model's JSON-able results (for the GMM: Table 1a rows, references, settings).
    """
    problem = models.get(model)
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise APGError(f"--checkpoint {checkpoint}: not a directory")
    checkpoints = {}
    for m in problem.methods:
        try:
            checkpoints[m] = find_checkpoint(checkpoint, model, m)
        except APGError:
            if m not in problem.optional_methods:
                raise
    metrics = {m: find_metrics(checkpoint, model, m) for m in problem.methods}
    trained = {}
    for m, path in checkpoints.items():
        t = load_proposals(path)
        if t.problem.name != model:
            raise APGError(f"{path} holds {t.problem.name} networks, not {model} ones")
        trained[m] = t
    if plots is not None:
        os.makedirs(plots, exist_ok=True)
    return problem.evaluate(trained, dict(options or {}), plots=plots, metrics=metrics, progress=progress)
