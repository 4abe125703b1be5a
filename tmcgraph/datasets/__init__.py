"""Real hierarchical data sets, each with its model and a held-out split, shipped small.

Each module has ``load() -> Dataset``.  A `Dataset` holds the training observations and the declared model of
the training split, the held-out observations, and the held-out log-likelihood of posterior samples, so that
`tmcgraph.learn.predictive_log_likelihood` measures a fitted model on data it has not seen.  Every data file
states its source and licence in its module's docstring and in docs/learning.md.

* `radon`: log radon levels of houses in 4 US states, 300 zip codes each (Gelman and Hill, 2007); held out: the
  second half of each state's zip codes.
* `bus_breakdown`: whether NYC school-bus delays exceeded 30 minutes, 2 years x 3 boroughs x 300 incidents (NYC
  Open Data); held out: the second half of each borough's incidents.
* `occupancy`: 12 bird species seen or not on 5 visits to 300 sites in 6 years (North American Breeding Bird
  Survey), each site's presence a discrete latent; held out: the last 100 sites.
* `chimpanzees`: 7 chimpanzees' lever pulls in 6 blocks of 12 trials (Silk et al., 2005); read from a folder you
  give (GPL-3 data, not shipped); held out: the last 2 trials of each block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

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
        groups: the latents the papers draw jointly, one sample index per group (``Model.compile``'s ``groups``).
        test_latents: the latents ``test_log_likelihood`` reads (``None``: all), the only ones to sample for it.
    """

    name: str
    train: Dict[str, torch.Tensor]
    test: Dict[str, torch.Tensor]
    model: Callable[[], Model]
    test_log_likelihood: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    source: str
    licence: str
    groups: Tuple[Tuple[str, ...], ...] = ()
    test_latents: Optional[Tuple[str, ...]] = None
