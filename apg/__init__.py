"""apg: amortized population Gibbs samplers built on tmcgraph (in progress).

Available now:

* :mod:`apg.resampling`: multinomial and systematic resampling from log-weights.
* :mod:`apg.gmm`: the Gaussian mixture of the APG paper (section 5.1): simulator,
  exact Gibbs conditionals, closed-form evidence given assignments, exact Gibbs sampler,
  and the exact conditionals as APG blocks.
* :mod:`apg.sampler`: the functional APG sampler core (blocks, eq. 9 incremental
  weights, resampling before every block, running log-evidence, ESS per block).

Learned proposals (neural sufficient statistics), objectives, baselines and the
training CLI are not written yet.
"""

from . import gmm, resampling, sampler

__all__ = ["gmm", "resampling", "sampler"]
