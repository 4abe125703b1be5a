"""Settings and simulator of the deep generative mixture (rings) of the APG paper (Wu et al., ICML 2020, sec. 5.2).

The true generative process (unknown to the learner, who learns the decoder)::

    mu_i ~ Normal(0, sigma0^2 I)                     i < I ring centres, in R^2
    c_n = the ring of point n (balanced: N / I points per ring, shuffled)
    alpha_n ~ Uniform[-pi, pi)                      the angle on the ring
    x_n = mu_{c_n} + radius (cos alpha_n, sin alpha_n) + noise_n,   noise_n ~ Normal(0, sigma_eps^2 I)

Choices, and where they come from (each is a `DGMMConfig` field):

* ``I = 4`` rings, ``N = 200`` points, ``sigma0 = 3.5`` and ``Sigma_eps = 0.2``: the
  paper.  We read ``Sigma_eps`` as the noise's standard deviation per
  coordinate, the same in the simulator and the model.  The paper writes it like
  a covariance but gives one number; the official code has two readings: its
  simulator's noise standard deviation is 0.1 and its model's 0.5
  (``noise=0.1, model_noise=0.5`` here; ``noise`` alone sets both).
* ``radius = 2``: the official simulator (the paper does not say).
* balanced clusters (exactly ``N / I`` points per ring, the remainder spread
  over the first rings): the official simulator.  The points are shuffled.
* angles i.i.d. uniform (``angles="uniform"``): the paper's model.  We use
  ``[-pi, pi)``, the range of the von Mises proposals; any interval of length
  ``2 pi`` is the same model.  ``angles="even"`` simulates as the official code
  does: each ring's points in two laps, each lap ``linspace(0, 2 pi)`` (both ends
  included) shifted by a uniform fraction of its spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ...errors import APGError

__all__ = ["ANGLES", "DGMMConfig", "PAPER", "simulate"]

#: the simulator's angle schemes (see the module docstring)
ANGLES = ("uniform", "even")


@dataclass(frozen=True)
class DGMMConfig:
    """Sizes, the prior and the fixed noise of the DGMM (the paper's values; see the module docstring).

    Attributes:
        num_clusters: I.
        num_points: N of the training datasets.
        sigma0: standard deviation of the ring centres' prior, per coordinate.
        noise: standard deviation of the simulator's observation noise, per coordinate (and the model's unless
            ``model_noise`` is set).
        radius: the true rings' radius (simulator only: the model learns its own).
        model_noise: the model's noise standard deviation, when it differs from the simulator's (``None``: the same).
        angles: how the simulator draws the angles: ``"uniform"`` (i.i.d., the paper's model) or ``"even"`` (evenly
            spaced in randomly shifted laps, the official simulator).
    """

    num_clusters: int = 4
    num_points: int = 200
    sigma0: float = 3.5
    noise: float = 0.2
    radius: float = 2.0
    model_noise: Optional[float] = None
    angles: str = "uniform"

    def __post_init__(self) -> None:
        for name in ("sigma0", "noise", "radius"):
            if not getattr(self, name) > 0:
                raise APGError(f"{name} must be positive, got {getattr(self, name)!r} (--{name.replace('_', '-')})")
        if self.model_noise is not None and not self.model_noise > 0:
            raise APGError(f"model_noise must be positive, got {self.model_noise!r} (--model-noise)")
        if self.angles not in ANGLES:
            raise APGError(f"angles must be one of {list(ANGLES)}, got {self.angles!r} (--angles)")

    @property
    def likelihood_noise(self) -> float:
        """The model's noise standard deviation (``model_noise``, else ``noise``)."""
        return self.noise if self.model_noise is None else self.model_noise

    @property
    def dim(self) -> int:
        """The data's dimension (2)."""
        return 2


#: the paper's settings
PAPER = DGMMConfig()


def simulate(num_datasets: int, cfg: DGMMConfig = PAPER, *, seed: int = 0,
             num_points: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Draw datasets of rings (float32, a function of ``seed`` alone).

    Args:
        num_datasets: B.
        cfg: the settings.
        seed: the seed.
        num_points: N (default ``cfg.num_points``); at least ``I``.

    Returns:
        ``{"x": (B, N, 2), "mu": (B, I, 2), "c": (B, N) int64, "alpha": (B, N)}``.
    """
    n = cfg.num_points if num_points is None else num_points
    k = cfg.num_clusters
    if num_datasets < 1 or n < k:
        raise APGError(f"simulate needs num_datasets >= 1 and num_points >= num_clusters ({k}), "
                       f"got {num_datasets} and {n}")
    g = torch.Generator().manual_seed(seed)
    mu = cfg.sigma0 * torch.randn(num_datasets, k, 2, generator=g, dtype=torch.float64)
    balanced = torch.arange(n) % k  # N / I per ring (the first N mod I rings get one more)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(num_datasets)])
    c = balanced[order]
    alpha = (torch.rand(num_datasets, n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    if cfg.angles == "even":
        alpha = _even_angles(c, k, g)
    ring = cfg.radius * torch.stack([alpha.cos(), alpha.sin()], -1)
    centre = torch.gather(mu, 1, c.unsqueeze(-1).expand(-1, -1, 2))
    x = centre + ring + cfg.noise * torch.randn(num_datasets, n, 2, generator=g, dtype=torch.float64)
    return {"x": x.float(), "mu": mu.float(), "c": c, "alpha": alpha.float()}


def _even_angles(c: torch.Tensor, k: int, g: torch.Generator, laps: int = 2) -> torch.Tensor:
    """The official simulator's angles: each ring's points in ``laps`` laps of evenly spaced angles.

    A lap of ``m`` points is ``linspace(0, 2 pi, m)`` (both ends included) plus a shift drawn uniformly in
    ``[0, 2 pi / (m - 1))``; the angles are wrapped into ``[-pi, pi)``.  ``c (B, N)`` -> ``(B, N)`` float64.
    """
    alpha = torch.empty(c.shape, dtype=torch.float64)
    for b in range(c.shape[0]):
        for i in range(k):
            idx = (c[b] == i).nonzero().squeeze(-1)
            parts = []
            for lap in torch.arange(idx.numel()).tensor_split(laps):
                m = lap.numel()
                if m == 0:
                    continue
                step = 2 * math.pi / (m - 1) if m > 1 else 2 * math.pi
                shift = float(torch.rand((), generator=g, dtype=torch.float64)) * step
                parts.append(torch.linspace(0, 2 * math.pi, m, dtype=torch.float64) + shift)
            alpha[b, idx] = torch.cat(parts)
    return torch.remainder(alpha + math.pi, 2 * math.pi) - math.pi
