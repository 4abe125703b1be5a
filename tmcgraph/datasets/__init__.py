"""Real hierarchical data sets, each with its model and a held-out split, shipped small.

Each module has ``load() -> Dataset``.  A `Dataset` holds the training observations and the declared model of
the training split, the held-out observations, and the held-out log-likelihood of posterior samples, so that
`tmcgraph.learn.predictive_log_likelihood` measures a fitted model on data it has not seen.  Every data file
states its source and licence in its module's docstring and in docs/learning.md.

* `radon`: log radon levels of houses in 4 US states, 300 zip codes each (Gelman and Hill, 2007); held out: the
  second half of each state's zip codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping

import torch

from ..model import Model

__all__ = ["DATA_DIR", "Dataset"]

#: where the shipped data files are
DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Dataset:
    """A data set with its model and a held-out split.

    Attributes:
        name: the data set's name.
        train: observation name -> value of the training split, as the model's ``log_marginal`` takes it.
        test: observation name -> value of the held-out split.
        model: builds the model of the training split (a new `tmcgraph.Model` each call).
        test_log_likelihood: ``f(samples) -> (N,)``: ``log p(test | z_n)`` for N joint posterior samples, given
            as latent -> ``(N, *plates of the latent, *event)`` (`tmcgraph.Posterior.sample`'s layout).
        source: where the data come from.
        licence: the data's licence.
    """

    name: str
    train: Dict[str, torch.Tensor]
    test: Dict[str, torch.Tensor]
    model: Callable[[], Model]
    test_log_likelihood: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    source: str
    licence: str
