"""Occupancy: whether 12 bird species were seen on 5 visits to survey sites, with each site's presence latent.

Data (``data/occupancy.csv.gz``, 21,600 rows: ``year, bird, site, weather, quality, seen_1 .. seen_5``): the
North American Breeding Bird Survey (US Geological Survey).  ``weather`` is the visit's temperature, ``quality``
1 for a good survey; ``seen_r`` whether the species was recorded on visit r.  The selection (6 years, 12
species, 300 sites; the first 200 sites train, the other 100 are held out) is split 0 of the massively parallel
learning papers (Heap, Bowyer and Aitchison; the alan-ppl/alan repository's occupancy data), whose numbers
these are.  Licence: a work of the US federal government (USGS), in the public domain in the US.

Model (as those papers declare it; ``exp`` of the ``log_var`` latents is used as a standard deviation)::

    bird_mean_mean, bird_mean_log_var, alpha_mean, alpha_log_var, beta_mean, beta_log_var ~ N(0, 1)
    for each species b:
        bird_mean_b ~ N(bird_mean_mean, exp(bird_mean_log_var))
        alpha_b ~ N(alpha_mean, exp(alpha_log_var))       beta_b ~ N(beta_mean, exp(beta_log_var))
        for each year y:
            bird_year_mean_by ~ N(bird_mean_b, 1)
            for each site s:
                z_bys ~ Bernoulli(logits = bird_year_mean_by * weather_bys * beta_b)      (present?)
                for each visit r:
                    seen_bysr ~ Bernoulli(logits = alpha_b * quality_bys * z_bys - 10 (1 - z_bys))

The papers sample the presence ``z`` from its prior; here it is enumerated (summed exactly over {0, 1}, a
discrete latent TMC marginalises), so the ELBO here is the tighter one.  The held-out log-likelihood sums
``z`` out of each held-out site in closed form.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.distributions import Bernoulli, Normal

from ..model import Model
from . import DATA_DIR, Dataset

__all__ = ["load", "model"]

YEARS, BIRDS, SITES, TRAIN, VISITS = 6, 12, 300, 200, 5


def _columns() -> Mapping[str, torch.Tensor]:
    table = np.loadtxt(DATA_DIR / "occupancy.csv.gz", delimiter=",", skiprows=1, dtype=np.int64)
    table = table[np.lexsort((table[:, 2], table[:, 0], table[:, 1]))]  # bird, year, site
    dtype = torch.get_default_dtype()
    as_grid = lambda c: torch.tensor(c).to(dtype).reshape(BIRDS, YEARS, SITES)  # noqa: E731
    return {"weather": as_grid(table[:, 3]), "quality": as_grid(table[:, 4]),
            "seen": torch.tensor(table[:, 5:]).to(dtype).reshape(BIRDS, YEARS, SITES, VISITS)}


def _present_logits(bird_year_mean: torch.Tensor, beta: torch.Tensor, weather: torch.Tensor) -> torch.Tensor:
    return bird_year_mean * weather * beta


def _seen_logits(alpha: torch.Tensor, quality: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return alpha * quality * z - 10.0 * (1 - z)


def model(weather: torch.Tensor, quality: torch.Tensor) -> Model:
    """The occupancy model over ``weather`` and ``quality`` ``(birds, years, sites)``; observation ``seen``."""
    birds, years, sites = weather.shape
    m = Model().plate("birds", birds).plate("years", years).plate("sites", sites).plate("visits", VISITS)
    for name in ("bird_mean_mean", "bird_mean_log_var", "alpha_mean", "alpha_log_var", "beta_mean", "beta_log_var"):
        m.latent(name, prior=lambda: Normal(0.0, 1.0))
    m.latent("bird_mean", prior=lambda bird_mean_mean, bird_mean_log_var: Normal(bird_mean_mean,
                                                                                 bird_mean_log_var.exp()),
             plates=["birds"])
    m.latent("alpha", prior=lambda alpha_mean, alpha_log_var: Normal(alpha_mean, alpha_log_var.exp()),
             plates=["birds"])
    m.latent("beta", prior=lambda beta_mean, beta_log_var: Normal(beta_mean, beta_log_var.exp()), plates=["birds"])
    m.latent("bird_year_mean", prior=lambda bird_mean: Normal(bird_mean, 1.0), plates=["birds", "years"])
    w, q = weather[..., None], quality[..., None]  # (birds, years, sites, 1): the visits plate's dim
    m.latent("z", prior=lambda bird_year_mean, beta: Bernoulli(logits=_present_logits(bird_year_mean, beta, w)),
             plates=["birds", "years", "sites"], enumerate=True)
    m.observe("seen", lambda alpha, z: Bernoulli(logits=_seen_logits(alpha, q, z)),
              plates=["birds", "years", "sites", "visits"])
    return m


def load() -> Dataset:
    """The occupancy data set: 12 species x 6 years x 200 sites x 5 visits to train on, 100 sites held out."""
    cols = _columns()
    train = {k: v[:, :, :TRAIN] for k, v in cols.items()}
    test = {k: v[:, :, TRAIN:] for k, v in cols.items()}

    def test_log_likelihood(samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        alpha, beta = samples["alpha"][:, :, None, None], samples["beta"][:, :, None, None]  # (N, birds, 1, 1)
        bym = samples["bird_year_mean"][..., None]  # (N, birds, years, 1)
        present = _present_logits(bym, beta, test["weather"])  # (N, birds, years, sites)
        per_z = []
        for z in (0.0, 1.0):
            seen = Bernoulli(logits=_seen_logits(alpha[..., None], test["quality"][..., None],
                                                 torch.tensor(z))).log_prob(test["seen"]).sum(-1)
            per_z.append(Bernoulli(logits=present).log_prob(torch.tensor(z)) + seen)
        return torch.logsumexp(torch.stack(per_z), 0).sum((-3, -2, -1))

    return Dataset(
        name="occupancy",
        train={"seen": train["seen"]},
        test={"seen": test["seen"]},
        model=lambda: model(train["weather"], train["quality"]),
        test_log_likelihood=test_log_likelihood,
        source="North American Breeding Bird Survey (USGS); split 0 of Heap, Bowyer and Aitchison (alan-ppl/alan)",
        licence="US federal government work (USGS), public domain in the US",
        groups=(("bird_mean_mean", "bird_mean_log_var", "alpha_mean", "alpha_log_var", "beta_mean",
                 "beta_log_var"), ("bird_mean", "alpha", "beta")),
        test_latents=("alpha", "beta", "bird_year_mean"),  # the held-out sites' presence is summed out
    )
