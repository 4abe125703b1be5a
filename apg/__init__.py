"""apg: amortized population Gibbs samplers built on tmcgraph.

* :mod:`apg.sampler`: the functional APG core (Algorithms 1-3): blocks, eq. 9
  incremental weights, resampling before every block, per-element weights for
  blocks local to a plate, the running log-evidence, ESS per block, and the
  surrogate losses of eqs. 5 and 6; :func:`apg.sampler.joint_block`.
* :mod:`apg.proposals`: exponential-family proposals from prior parameters plus
  neural sufficient statistics (Normal-Gamma, Normal, Categorical) and their KLs.
* :mod:`apg.resampling`: multinomial and systematic resampling from log-weights.
* :mod:`apg.gmm`: the Gaussian mixture of section 5.1 declared as a
  :class:`tmcgraph.Model` (blankets from its factor graph), its exact
  conditionals and Gibbs sampler, the learned proposals of appendix E and the
  RWS baselines' encoders, and the inclusive KL of eq. 4.
* :mod:`apg.train`, :mod:`apg.evaluate`, :mod:`apg.cli`: ``apg train gmm`` and
  ``apg evaluate gmm`` (Table 1a, Figs. 1a and 2).
"""

from . import gmm, proposals, resampling, sampler

__all__ = ["gmm", "proposals", "resampling", "sampler"]
