"""What a model gives the generic training and evaluation drivers: a `Problem`.

A problem bundles a model (its generative model, with or without learned
parameters theta), its training data, the proposal architectures (*methods*,
e.g. APG and the RWS baselines) and how its results are evaluated.  The
drivers (`apg.train.train`, `apg.evaluate.evaluate`, the ``apg``
command line) only talk to this interface; models never train.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import APGError
from ..sampler import Result, Sampler

__all__ = ["Method", "Problem", "Trained"]


@dataclass(frozen=True)
class Method:
    """One proposal architecture of a problem.

    Attributes:
        name: e.g. ``"apg"``, ``"rws-mlp"``.
        description: one line for ``--help``.
        one_shot: trained and evaluated with ``num_sweeps = 1`` (RWS: no block kernels).
        train_defaults: training settings (fields of `apg.train.TrainConfig`)
            that reproduce the checkpoint shipped for this method.
    """

    name: str
    description: str
    one_shot: bool = False
    train_defaults: Mapping[str, Any] = field(default_factory=dict)


class Problem(ABC):
    """A model, its data and proposals, as the generic drivers see it.

    Attributes:
        name: the registry name (``apg train NAME``).
        description: one line for ``--help``.
        methods: method name -> `Method`, the first being the default.
        metric_fields: extra per-iteration training metrics (columns of metrics.csv).
        optional_methods: methods evaluated only when a checkpoint of theirs is found.
        theta_terms: where eq. 6 (the model's gradient) is recorded during training: ``"step"`` after
            every block update, ``"sweep"`` after each sweep's last block only (for models whose log
            joint is costly, see `apg.sampler.sweep`).
    """

    name: str = ""
    description: str = ""
    methods: Mapping[str, Method] = {}
    metric_fields: Tuple[str, ...] = ()
    optional_methods: Tuple[str, ...] = ()
    theta_terms: str = "step"

    def method(self, name: str) -> Method:
        """The `Method` called ``name``; an error lists the valid ones."""
        if name not in self.methods:
            raise APGError(f"model {self.name!r} has no method {name!r}; valid: {sorted(self.methods)} (--method)")
        return self.methods[name]

    def config(self) -> Dict[str, Any]:
        """The model's settings as JSON-able data (stored with checkpoints)."""
        return {}

    def with_config(self, config: Dict[str, Any]) -> "Problem":
        """The same problem with the settings of `config` (as stored with a checkpoint)."""
        return self

    def add_train_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the model's own ``apg train NAME`` options (settings of `config`, e.g. a data source)."""
        return None  # none by default

    def from_arguments(self, args: argparse.Namespace) -> "Problem":
        """The problem with the settings of the options added by `add_train_arguments`."""
        return self

    @abstractmethod
    def make_proposals(self, method: str) -> nn.Module:
        """Fresh proposal networks (phi) of ``method``, initialised from torch's default generator."""

    def make_model(self) -> nn.Module:
        """The generative model's learned parameters (theta); a module without parameters if none."""
        return nn.Module()

    def init_from(self, method: str, proposals: nn.Module, model: nn.Module, trained: "Trained") -> None:
        """Start ``method``'s fresh networks from ``trained`` ones (``apg train --init FILE``).

        The default copies everything and needs the same model and method; a problem may
        allow more (e.g. a method sharing some networks with another).
        """
        if (trained.problem.name, trained.method) != (self.name, method):
            raise APGError(f"--init holds {trained.problem.name} {trained.method!r} networks, not {self.name} "
                           f"{method!r} (--method)")
        proposals.load_state_dict(trained.proposals.state_dict())
        model.load_state_dict(trained.model.state_dict())

    @abstractmethod
    def sampler(self, proposals: nn.Module, model: nn.Module) -> Sampler:
        """The APG sampler of these proposals and this model (one-shot methods: no blocks)."""

    @abstractmethod
    def training_data(self, num_datasets: int, seed: int) -> torch.Tensor:
        """``num_datasets`` training datasets, stacked along dim 0 (a function of ``seed`` alone)."""

    def train_metrics(self, proposals: nn.Module, model: nn.Module, x: torch.Tensor,
                      result: Result) -> Dict[str, float]:
        """Extra metrics of a training batch (keys from `metric_fields`)."""
        return {}

    # -- evaluation --------------------------------------------------------------
    @abstractmethod
    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the model's ``apg evaluate NAME`` options."""

    @abstractmethod
    def evaluate(self, trained: Dict[str, "Trained"], options: Mapping[str, Any], *, plots: Optional[str],
                 metrics: Dict[str, Optional[str]], progress: bool) -> Dict[str, Any]:
        """Evaluate trained proposals.

        Args:
            trained: method -> its loaded networks (`apg.trained.load_proposals`; each of this
                model, checked by the caller).
            options: the model's evaluation options (``apg evaluate NAME`` flags,
                by their ``dest``; missing ones take their defaults).
            plots: a directory for figures, or ``None``.
            metrics: method -> its training metrics.csv (or ``None``), for training curves.
            progress: show progress (on stderr).

        Returns:
            JSON-able results.
        """

    @abstractmethod
    def format(self, out: Dict[str, Any]) -> str:
        """The results of `evaluate` as text."""


class Trained(NamedTuple):
    """A model's trained networks, as `apg.trained.load_proposals` loads them from a checkpoint."""

    problem: Problem
    method: str
    proposals: nn.Module
    model: nn.Module
