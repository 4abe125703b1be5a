"""apg: amortized population Gibbs samplers built on tmcgraph (in progress).

Available now:

* :mod:`apg.resampling`: multinomial and systematic resampling from log-weights.
* :mod:`apg.gmm`: the Gaussian mixture of the APG paper (section 5.1): simulator,
  exact Gibbs conditionals, closed-form evidence given assignments, exact Gibbs sampler.

The APG sampler, learned proposals, objectives and training CLI are not written yet.
"""

from . import gmm, resampling

__all__ = ["gmm", "resampling"]
