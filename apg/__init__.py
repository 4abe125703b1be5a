"""apg: amortized population Gibbs samplers (Wu et al., ICML 2020) built on tmcgraph.

* `apg.sampler`: the functional APG core (Algorithms 1-3): `init`,
  `sweep` and `run` over NamedTuple particles and
  infos, with an explicit ``torch.Generator``; blocks, eq. 9 incremental weights,
  resampling before every block, per-element weights for blocks local to a plate;
  `joint_block`.
* `apg.objectives`: the surrogate losses of eqs. 5 (proposals) and 6 (model).
* `apg.metrics`: ESS, log-mean-exp, weighted means.
* `apg.proposals`: exponential-family proposals from prior parameters plus
  neural sufficient statistics (Normal-Gamma, Normal, Categorical) and their KLs.
* `apg.resampling`: multinomial and systematic resampling from log-weights.
* `apg.models`: the registry of models (``"gmm"``: section 5.1).
* `apg.train`, `apg.evaluate`, `apg.cli`: generic training
  (checkpoints, resume) and evaluation, ``apg train MODEL`` / ``apg evaluate MODEL``.
"""

from . import metrics, models, objectives, proposals, resampling, sampler
from .errors import APGError

__version__ = "0.1.0"

__all__ = ["APGError", "__version__", "metrics", "models", "objectives", "proposals", "resampling", "sampler"]
