"""Bus breakdown: whether a New York City school bus delay lasted over 30 minutes, by year and borough.

Data (``data/bus_breakdown.csv``, 1,800 rows: ``year, borough, id, run_type, bus_company, delayed``): the City of
New York's "Bus Breakdown and Delays" records (NYC Open Data, published by the Department of Education).
``delayed`` is 1 when the reported delay exceeded 30 minutes; ``run_type`` (8 kinds) and ``bus_company`` (59
companies) are category indices.  The selection (2 school years, 3 boroughs each, 300 incidents per borough;
the first 150 train, the other 150 are held out) is split 0 of the massively parallel learning papers (Heap,
Bowyer and Aitchison; the alan-ppl/alan repository's bus_breakdown data), whose numbers these are.  Licence:
NYC Open Data, free for public use under the NYC Open Data terms of use.

Model (as those papers declare it)::

    psi ~ N(0, I_8)   phi ~ N(0, I_59)   mu_beta ~ N(0, 1)   sigma_beta ~ N(0, 1)
    for each year y:        beta_y ~ N(mu_beta, exp(sigma_beta))      sigma_alpha_y ~ N(0, 1)
      for each borough b:   alpha_yb ~ N(beta_y, exp(sigma_alpha_y))
        for each incident i: delayed_ybi ~ Bernoulli(logits = alpha_yb + phi[company_ybi] + psi[run_type_ybi])

``load(latent_delay=True)``: the model of the QEM paper's figure (alan-ppl/alan before commit 93aca48, 17 May
2024), with a latent logit per incident, ``log_delay_ybi ~ N(alpha_yb + phi[company_ybi] + psi[run_type_ybi], 1)``
and ``delayed_ybi ~ Bernoulli(logits = log_delay_ybi)``.  Its held-out log-likelihood draws each held-out
incident's ``log_delay`` once from that prior per posterior sample, as the paper's extended importance sample
does.  docs/learning.md compares both models' fits with the figure.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.distributions import Bernoulli, Independent, Normal

from ..model import Model
from . import DATA_DIR, Dataset

__all__ = ["load", "model"]

YEARS, BOROUGHS, INCIDENTS, TRAIN = 2, 3, 300, 150
RUN_TYPES, COMPANIES = 8, 59


def _columns() -> Mapping[str, torch.Tensor]:
    table = np.loadtxt(DATA_DIR / "bus_breakdown.csv", delimiter=",", skiprows=1, dtype=np.int64)
    order = np.lexsort((table[:, 2], table[:, 1], table[:, 0]))  # year, borough, id
    table = table[order]
    cols = {"run_type": 3, "bus_company": 4, "delayed": 5}
    return {k: torch.tensor(table[:, c]).reshape(YEARS, BOROUGHS, INCIDENTS) for k, c in cols.items()}


def _logits(alpha: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor, company: torch.Tensor,
            run_type: torch.Tensor) -> torch.Tensor:
    """``alpha + phi[company] + psi[run_type]``: ``phi``, ``psi`` ``(..., 1, 1, 1, categories)``."""
    one_hot = torch.nn.functional.one_hot
    return (alpha + (phi * one_hot(company, COMPANIES).to(phi.dtype)).sum(-1)
            + (psi * one_hot(run_type, RUN_TYPES).to(psi.dtype)).sum(-1))


def model(bus_company: torch.Tensor, run_type: torch.Tensor, latent_delay: bool = False) -> Model:
    """The bus breakdown model over category indices ``(years, boroughs, incidents)``; observation ``delayed``.

    ``latent_delay``: the QEM paper's figure's model, a latent ``log_delay`` logit per incident (module docstring).
    """
    years, boroughs, incidents = bus_company.shape
    m = Model().plate("years", years).plate("boroughs", boroughs).plate("incidents", incidents)
    m.latent("psi", prior=lambda: Independent(Normal(torch.zeros(RUN_TYPES), 1.0), 1))
    m.latent("phi", prior=lambda: Independent(Normal(torch.zeros(COMPANIES), 1.0), 1))
    m.latent("mu_beta", prior=lambda: Normal(0.0, 1.0))
    m.latent("sigma_beta", prior=lambda: Normal(0.0, 1.0))
    m.latent("beta", prior=lambda mu_beta, sigma_beta: Normal(mu_beta, sigma_beta.exp()), plates=["years"])
    m.latent("sigma_alpha", prior=lambda: Normal(0.0, 1.0), plates=["years"])
    m.latent("alpha", prior=lambda beta, sigma_alpha: Normal(beta, sigma_alpha.exp()), plates=["years", "boroughs"])
    per_incident = ["years", "boroughs", "incidents"]
    if latent_delay:
        m.latent("log_delay", plates=per_incident,
                 prior=lambda alpha, phi, psi: Normal(_logits(alpha, phi, psi, bus_company, run_type), 1.0))
        m.observe("delayed", lambda log_delay: Bernoulli(logits=log_delay), plates=per_incident)
    else:
        m.observe("delayed", lambda alpha, phi, psi: Bernoulli(logits=_logits(alpha, phi, psi, bus_company, run_type)),
                  plates=per_incident)
    return m


def load(latent_delay: bool = False) -> Dataset:
    """The bus breakdown data set: 2 years x 3 boroughs x 150 incidents to train on, and 150 more held out.

    ``latent_delay``: the QEM paper's figure's model, with a latent logit per incident (module docstring).
    """
    cols = _columns()
    train = {k: v[..., :TRAIN] for k, v in cols.items()}
    test = {k: v[..., TRAIN:] for k, v in cols.items()}

    def test_log_likelihood(samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        alpha = samples["alpha"][..., None]  # (N, years, boroughs, 1)
        phi, psi = (samples[n][:, None, None, None, :] for n in ("phi", "psi"))  # (N, 1, 1, 1, categories)
        logits = _logits(alpha, phi, psi, test["bus_company"], test["run_type"])
        if latent_delay:  # each held-out incident's logit drawn from its prior
            logits = Normal(logits, 1.0).sample()
        return Bernoulli(logits=logits).log_prob(test["delayed"].to(logits.dtype)).sum((-3, -2, -1))

    return Dataset(
        name="bus_breakdown",
        train={"delayed": train["delayed"].to(torch.get_default_dtype())},
        test={"delayed": test["delayed"].to(torch.get_default_dtype())},
        model=lambda: model(train["bus_company"], train["run_type"], latent_delay),
        test_log_likelihood=test_log_likelihood,
        source="City of New York, 'Bus Breakdown and Delays' (NYC Open Data); split 0 of Heap, Bowyer and Aitchison "
               "(alan-ppl/alan)",
        licence="NYC Open Data terms of use (free public use)",
        groups=(("psi", "phi", "sigma_beta", "mu_beta"), ("beta", "sigma_alpha")),
        test_latents=("alpha", "phi", "psi") if latent_delay else None,
    )
