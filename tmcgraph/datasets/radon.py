"""Radon: log radon levels in houses, grouped by US state, with floor and county uranium as covariates.

Data (``data/radon.csv``, 1,200 rows: ``state, zip, basement, log_uranium, log_radon``): the US EPA's National
Residential Radon Survey (files ``srrs2.dat`` and ``cty.dat``, as distributed with Gelman and Hill, "Data Analysis
Using Regression and Multilevel/Hierarchical Models", 2007).  ``log_radon = log(activity + 0.1)``,
``log_uranium = log(Uppm + 0.1)`` of the house's county, ``basement`` 1 if measured in a basement.  The selection
(4 states drawn at random, the first house of the first 300 zip codes of each) is the one of the massively
parallel learning papers (Heap, Bowyer and Aitchison; the alan-ppl/alan repository's radon data), whose
numbers are these.  Licence: a work of the US federal government, in the public domain in the US.

Model (as those papers declare it)::

    global_mean ~ N(0, 1)                 global_log_sigma ~ N(0, 1)
    for each state s:
        state_mean_s ~ N(global_mean, exp(global_log_sigma))      state_log_sigma_s ~ N(0, 1)
        beta_uranium_s ~ N(0, 1)                                  beta_basement_s ~ N(0, 1)
        for each zip code z:  log_radon_sz ~ N(state_mean_s + basement_sz beta_basement_s
                                              + log_uranium_sz beta_uranium_s, exp(state_log_sigma_s))

Split: the first 150 zip codes of each state train, the other 150 are held out (as in those papers).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.distributions import Normal

from ..model import Model
from . import DATA_DIR, Dataset

__all__ = ["load"]

STATES, ZIPS, TRAIN_ZIPS = 4, 300, 150


def _columns() -> Mapping[str, torch.Tensor]:
    table = np.loadtxt(DATA_DIR / "radon.csv", delimiter=",", skiprows=1, dtype=np.float64)
    cols = {"basement": 2, "log_uranium": 3, "log_radon": 4}
    return {k: torch.tensor(table[:, c], dtype=torch.get_default_dtype()).reshape(STATES, ZIPS)
            for k, c in cols.items()}


def model(basement: torch.Tensor, log_uranium: torch.Tensor) -> Model:
    """The radon model over ``basement`` and ``log_uranium`` of shape ``(states, zips)``; observation ``log_radon``."""
    states, zips = basement.shape
    m = Model().plate("states", states).plate("zips", zips)
    m.latent("global_mean", prior=lambda: Normal(0.0, 1.0))
    m.latent("global_log_sigma", prior=lambda: Normal(0.0, 1.0))
    m.latent("state_mean", prior=lambda global_mean, global_log_sigma: Normal(global_mean, global_log_sigma.exp()),
             plates=["states"])
    m.latent("state_log_sigma", prior=lambda: Normal(torch.zeros(states, 1), 1.0), plates=["states"])
    m.latent("beta_uranium", prior=lambda: Normal(torch.zeros(states, 1), 1.0), plates=["states"])
    m.latent("beta_basement", prior=lambda: Normal(torch.zeros(states, 1), 1.0), plates=["states"])
    m.observe("log_radon", lambda state_mean, state_log_sigma, beta_uranium, beta_basement: Normal(
        state_mean + basement * beta_basement + log_uranium * beta_uranium, state_log_sigma.exp()),
        plates=["states", "zips"])
    return m


def load() -> Dataset:
    """The radon data set: 4 states, 150 zip codes each to train on and 150 held out."""
    cols = _columns()
    train = {k: v[:, :TRAIN_ZIPS] for k, v in cols.items()}
    test = {k: v[:, TRAIN_ZIPS:] for k, v in cols.items()}

    def test_log_likelihood(samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loc = (samples["state_mean"][..., None] + test["basement"] * samples["beta_basement"][..., None]
               + test["log_uranium"] * samples["beta_uranium"][..., None])
        return Normal(loc, samples["state_log_sigma"][..., None].exp()).log_prob(test["log_radon"]).sum((-2, -1))

    return Dataset(
        name="radon",
        train={"log_radon": train["log_radon"]},
        test={"log_radon": test["log_radon"]},
        model=lambda: model(train["basement"], train["log_uranium"]),
        test_log_likelihood=test_log_likelihood,
        source="US EPA National Residential Radon Survey via Gelman and Hill (2007); selection of Heap, Bowyer and "
               "Aitchison (alan-ppl/alan)",
        licence="US federal government work, public domain in the US",
        groups=(("global_mean", "global_log_sigma"),),
    )
