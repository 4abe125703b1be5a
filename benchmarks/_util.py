"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

import torch


def write_json(path: Optional[str], rows: Any) -> None:
    """Write ``rows`` to ``path`` (directories created); nothing when ``path`` is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)


def standardised_errors(means: Mapping[str, Any], reference: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Per latent in ``reference`` (a `nuts_reference.py` run): ``(means - reference mean) / reference sd``, flat.

    ``means``: latent -> nested lists (or tensors) of posterior means, shaped as the reference's.
    """
    out = {}
    for name, ref in reference["mean"].items():
        sd = torch.tensor(reference["var"][name], dtype=torch.float64).clamp_min(1e-24).sqrt()
        got = torch.as_tensor(means[name], dtype=torch.float64)
        out[name] = ((got - torch.tensor(ref, dtype=torch.float64)) / sd).flatten()
    return out
