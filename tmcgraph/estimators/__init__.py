"""Estimators on a declared `Model`: TMC, IWAE, SMC, DReGs, posterior summaries.

One estimator a module: `.tmc`, `.iwae`, `.smc`, `.dregs`, `.posterior`,
over `.base`; sampling and factor building are `tmcgraph.trace.trace`.

All of them share one sampling routine, `trace`, that draws samples in
topological order and turns prior, proposal and likelihood densities into
log-factors over sample indices.  What differs is the index assignment:

* TMC: every sampled latent has its own index of K samples; a proposal whose
  parents are latents is the mixture over the parents' samples (appendix C,
  eqs. 46-47), so each latent's proposal factor depends on its own index only.
* IWAE: every sampled latent shares one particle index (joint samples); a
  proposal takes its parents' values of the same particle.
* Enumerated latents (``enumerate=True``) always get their own index over their
  support, with no proposal and no ``1/K`` (appendix D).

The log-factors go into a `FactorGraph` compiled once; the
estimate is ``plan.log_sum(factors) - sum over sampled index copies of log K``.
"""

from .base import PARTICLES
from .iwae import IWAE, iwae
from .posterior import Posterior
from .smc import smc
from .tmc import TMC

__all__ = ["IWAE", "PARTICLES", "Posterior", "TMC", "iwae", "smc"]
