"""Bouncing MNIST (Wu et al., ICML 2020, section 5.5), registered as ``"bmnist"``.

* `.digits`: digit images from MNIST's IDX files (``--mnist-dir``) or scikit-learn's
  bundled 8x8 digits (no download).
* `.simulate`: the spatial transformer (`place`, `crop`), the
  bouncing physics and the seeded video simulator, with the paper's and a CPU profile.
* `.model`: the generative model as a tmcgraph ``Model`` (learned digit decoder,
  Markov positions, Bernoulli frames) and its Markov blankets.
* `.networks`: the proposals (positions by template correlation, digit by digit;
  digits from spatial-transformer crops); `.sampler`: the APG sampler, T + 1 blocks.
* `.problem`: the problem the generic drivers train and evaluate; `.evaluation`:
  Fig. 4 (reconstruction MSE against sweeps, for T and D beyond training) and Fig. 3.
"""

from .digits import MNIST_FILES, load_digits, mnist, read_idx, sklearn_digits
from .simulate import CPU, PAPER, PROFILES, BMNISTConfig, Videos, crop, place, render, simulate, trajectories

__all__ = ["BMNISTConfig", "CPU", "MNIST_FILES", "PAPER", "PROFILES", "Videos", "crop", "load_digits", "mnist", "place",
           "read_idx", "render", "simulate", "sklearn_digits", "trajectories"]
