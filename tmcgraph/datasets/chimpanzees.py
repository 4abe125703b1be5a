"""Chimpanzees: which lever 7 chimpanzees pulled, with and without a partner present (read from your folder).

Data: ``chimpanzees.csv`` as distributed in McElreath's ``rethinking`` R package: 504 trials of Silk et al.
(Nature 437:1357-1359, 2005), semicolon-separated columns ``actor, recipient, condition, block, trial,
prosoc_left, chose_prosoc, pulled_left`` (older copies write ``.`` for ``_``).  That package is GPL-3
licensed, so the file is not shipped here: pass the folder that holds it (``load(folder)``, or the
``TMCGRAPH_DATA`` environment variable), e.g. after
``wget https://raw.githubusercontent.com/rmcelreath/rethinking/master/data/chimpanzees.csv``.

Each (actor, block) has 12 trials; ordered by trial number, the first 10 train and the last 2 are held out (the
massively parallel learning papers' split: 10 of 12 repeats; they reshaped the file in its row order, which
groups trials by condition rather than by block, and here the trials are grouped by their block column).

Model (as those papers declare it)::

    sigma_block, sigma_actor ~ N(0, 1)      alpha, beta_P, beta_PC ~ N(0, 10)
    for each actor a:        alpha_actor_a ~ N(0, exp(sigma_actor))
      for each block b:      alpha_block_ab ~ N(0, exp(sigma_block))
        for each trial r:    pulled_left_abr ~ Bernoulli(logits = alpha + alpha_actor_a + alpha_block_ab
                                                          + (beta_P + beta_PC condition_abr) prosoc_left_abr)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch
from torch.distributions import Bernoulli, Normal

from ..errors import TMCError
from ..model import Model
from . import Dataset

__all__ = ["load", "model"]

ACTORS, BLOCKS, TRIALS, TRAIN = 7, 6, 12, 10
FILE = "chimpanzees.csv"


def _find(folder: Optional[Union[str, Path]]) -> Path:
    where = folder if folder is not None else os.environ.get("TMCGRAPH_DATA")
    if where is None or not (Path(where) / FILE).is_file():
        raise TMCError(f"chimpanzees: {FILE} not found in {where!r}; pass load(folder) or set TMCGRAPH_DATA to the "
                       "folder holding the rethinking package's data/chimpanzees.csv (GPL-3, so not shipped here)")
    return Path(where) / FILE


def _columns(path: Path) -> Mapping[str, torch.Tensor]:
    with open(path) as f:
        header = [h.strip('"').replace(".", "_") for h in f.readline().strip().split(";")]  # older copies: dots
    want = ["actor", "condition", "block", "trial", "prosoc_left", "pulled_left"]
    missing = [c for c in want if c not in header]
    if missing:
        raise TMCError(f"chimpanzees: {path} has no column(s) {missing}; columns: {header}")
    table = np.genfromtxt(path, delimiter=";", skip_header=1, usecols=[header.index(c) for c in want])
    table = table[np.lexsort((table[:, 3], table[:, 2], table[:, 0]))]  # actor, block, trial
    if table.shape[0] != ACTORS * BLOCKS * TRIALS:
        raise TMCError(f"chimpanzees: expected {ACTORS * BLOCKS * TRIALS} trials (7 actors x 6 blocks x 12), "
                       f"got {table.shape[0]}")
    dtype = torch.get_default_dtype()
    grid = {k: torch.tensor(table[:, want.index(c)]).to(dtype).reshape(ACTORS, BLOCKS, TRIALS)
            for k, c in (("condition", "condition"), ("prosoc_left", "prosoc_left"), ("pulled_left", "pulled_left"))}
    return grid


def _logits(alpha: torch.Tensor, alpha_actor: torch.Tensor, alpha_block: torch.Tensor, beta_p: torch.Tensor,
            beta_pc: torch.Tensor, condition: torch.Tensor, prosoc_left: torch.Tensor) -> torch.Tensor:
    return alpha + alpha_actor + alpha_block + (beta_p + beta_pc * condition) * prosoc_left


def model(condition: torch.Tensor, prosoc_left: torch.Tensor) -> Model:
    """The chimpanzees model over ``condition`` and ``prosoc_left`` ``(actors, blocks, trials)``."""
    actors, blocks, trials = condition.shape
    m = Model().plate("actors", actors).plate("blocks", blocks).plate("trials", trials)
    m.latent("sigma_block", prior=lambda: Normal(0.0, 1.0))
    m.latent("sigma_actor", prior=lambda: Normal(0.0, 1.0))
    for name in ("beta_PC", "beta_P", "alpha"):
        m.latent(name, prior=lambda: Normal(0.0, 10.0))
    m.latent("alpha_actor", prior=lambda sigma_actor: Normal(0.0, sigma_actor.exp()), plates=["actors"])
    m.latent("alpha_block", prior=lambda sigma_block: Normal(0.0, sigma_block.exp()), plates=["actors", "blocks"])
    m.observe("pulled_left", lambda alpha, alpha_actor, alpha_block, beta_P, beta_PC: Bernoulli(logits=_logits(
        alpha, alpha_actor, alpha_block, beta_P, beta_PC, condition, prosoc_left)),
        plates=["actors", "blocks", "trials"])
    return m


def load(folder: Optional[Union[str, Path]] = None) -> Dataset:
    """The chimpanzees data set from ``folder`` (or ``$TMCGRAPH_DATA``): 10 trials per block train, 2 held out."""
    path = _find(folder)
    cols = _columns(path)
    train = {k: v[..., :TRAIN] for k, v in cols.items()}
    test = {k: v[..., TRAIN:] for k, v in cols.items()}

    def test_log_likelihood(samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        glob = {n: samples[n][:, None, None, None] for n in ("alpha", "beta_P", "beta_PC")}
        logits = _logits(glob["alpha"], samples["alpha_actor"][:, :, None, None], samples["alpha_block"][..., None],
                         glob["beta_P"], glob["beta_PC"], test["condition"], test["prosoc_left"])
        return Bernoulli(logits=logits).log_prob(test["pulled_left"]).sum((-3, -2, -1))

    return Dataset(
        name="chimpanzees",
        train={"pulled_left": train["pulled_left"]},
        test={"pulled_left": test["pulled_left"]},
        model=lambda: model(train["condition"], train["prosoc_left"]),
        test_log_likelihood=test_log_likelihood,
        source=f"Silk et al. (2005), as distributed in the rethinking R package; read from {path}",
        licence="the rethinking package's GPL-3 (not shipped; read from the user's folder)",
        groups=(("sigma_block", "sigma_actor", "beta_PC", "beta_P", "alpha"),),
    )
