"""Trained networks on disk: `load_proposals` reads what `apg.train.train` writes.

A run directory holds ``proposals.pt`` (a finished run) or ``checkpoint.pt`` (an unfinished one, with
``config.json`` beside it); the package ships finished ones in ``apg/checkpoints`` (``shipped:NAME``).
Loading builds the networks through the model's `Problem`, found by name in the
registry; the models themselves never load files (`apg.evaluate.evaluate` hands them the loaded
networks).
"""

from __future__ import annotations

import json
import os

import torch

from . import models
from .errors import APGError
from .models.base import Trained

__all__ = ["Trained", "load_proposals"]


def load_proposals(path: str) -> Trained:
    """Networks saved by `train`.

    ``DIR/proposals.pt`` (a finished run) or ``DIR/checkpoint.pt`` (an unfinished one; its model and method are read
    from ``DIR/config.json``). ``shipped:NAME`` is the checkpoint ``NAME.pt`` shipped in ``apg/checkpoints``.
    """
    if path.startswith("shipped:"):
        path = os.path.join(os.path.dirname(__file__), "checkpoints", path[len("shipped:"):] + ".pt")
    if not os.path.exists(path):
        raise APGError(f"no such checkpoint: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" in blob:  # a proposals file (files written before models had names hold a "gmm" config)
        name = blob.get("model", "gmm")
        problem = models.get(name).with_config(blob.get("config", blob.get("gmm", {})))
        method, proposal_state, model_state = blob["method"], blob["state_dict"], blob.get("model_state_dict")
    else:
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            saved = json.load(f)
        problem = models.get(saved.get("model", "gmm"))
        problem_path = os.path.join(os.path.dirname(path), "problem.json")
        if os.path.exists(problem_path):
            with open(problem_path) as f:
                problem = problem.with_config(json.load(f))
        method, proposal_state, model_state = saved["method"], blob["proposals"], blob.get("model")
    proposals = problem.make_proposals(method)
    proposals.load_state_dict(proposal_state)
    model = problem.make_model()
    if model_state:
        model.load_state_dict(model_state)
    return Trained(problem, method, proposals, model)
