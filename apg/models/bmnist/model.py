"""The bouncing-MNIST generative model (Wu et al., ICML 2020, section 5.5) as a tmcgraph Model.

Per video, D digits and T frames::

    what ~ Normal(0, I)                       latent "what", event (D, 10): the digits' codes
    where_1 ~ Normal(0, I)                    latent "where_1", event (D, 2)
    where_t ~ Normal(where_{t-1}, 0.2^2 I)    latent "where_t", t = 2..T (the official code's prior)
    x_t ~ Bernoulli(clamp(sum_d place(g_theta(what_d), where_{t,d}), eps, 1 - eps))
                                              observation "x_t", event (H, H)

``g_theta`` (`DigitDecoder`) maps a code to a digit image (appendix E: FC 200 ReLU, FC 400
ReLU, sigmoid pixels); ``place`` is the spatial transformer of `.simulate`.  The likelihood is
the official code's Bernoulli log-likelihood of frames with values in ``[0, 1]``
(``x log p + (1 - x) log(1 - p)``, not a normalised density for fractional ``x``, as in the paper's
experiments).  The factor of ``x_t`` touches ``what`` and ``where_t`` only, so the Markov blanket of
``where_t`` is ``{where_t, where_{t+1}, x_t}`` (a position update costs O(1) frames; a sweep O(T)),
and that of ``what`` is every frame.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal
from typing_extensions import override

from tmcgraph import JointDensity, Model

from ...sampler import Result
from .simulate import BMNISTConfig, place

__all__ = ["BMNISTDensity", "DigitDecoder", "WHAT_DIM", "WHERE_STEP", "bmnist_model", "frames_to_data",
           "posterior_reconstruction",
           "log_joint", "reconstruct"]

#: the digit code's size (appendix E)
WHAT_DIM = 10
#: the standard deviation of a position's step (the official code's prior)
WHERE_STEP = 0.2
_EPS = 1e-6


class DigitDecoder(nn.Module):
    """``g_theta``: a code ``(..., 10)`` -> a digit image ``(..., h, h)`` with pixels in ``(0, 1)``.

    ``FC hidden[0] ReLU -> FC hidden[1] ReLU -> FC h*h sigmoid`` (appendix E: 200, 400 for 28x28 digits).

    Without autograd, the last result is reused when the same codes are decoded again (the same
    storage, shape, strides and version: a block's kernel and its two blanket evaluations decode the
    same ``what``).
    """

    def __init__(self, digit: int, hidden: Tuple[int, int] = (200, 400)) -> None:
        super().__init__()
        self.digit = digit
        self.net = nn.Sequential(nn.Linear(WHAT_DIM, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], digit * digit), nn.Sigmoid())
        self._memo: Optional[Tuple[tuple, torch.Tensor, torch.Tensor]] = None

    @override
    def forward(self, what: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._memo = None
            return self.net(what).reshape(what.shape[:-1] + (self.digit, self.digit))
        # the memo holds the input, so its storage cannot be reused while the key is alive
        key = (what.data_ptr(), what.shape, what.stride(), what.dtype, what.device, what._version,
               self._params_version())
        if self._memo is not None and self._memo[0] == key:
            return self._memo[2]
        out = self.net(what).reshape(what.shape[:-1] + (self.digit, self.digit))
        self._memo = (key, what, out)
        return out

    def _params_version(self) -> tuple:
        return tuple(p._version for p in self.net.parameters())


def reconstruct(decoder: DigitDecoder, what: torch.Tensor, where: torch.Tensor, canvas: int) -> torch.Tensor:
    """A frame's Bernoulli means.

    ``what (..., D, 10)``, ``where (..., D, 2)`` -> ``(..., H, H)`` in ``[eps, 1 - eps]`` (the placed digits summed and
    clamped).
    """
    placed = place(decoder(what), where, canvas)  # (..., D, H, H)
    return placed.sum(-3).clamp(_EPS, 1 - _EPS)


def bmnist_model(cfg: BMNISTConfig, decoder: DigitDecoder, num_frames: Optional[int] = None,
                 num_digits: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> Model:
    """The model as a `tmcgraph.Model`.

    Latents ``what``, ``where_1 .. where_T``; observations ``x_1 .. x_T`` (one frame each, event ``(H, H)``). T and D
    default to the profile's.
    """
    T = cfg.num_frames if num_frames is None else num_frames
    D = cfg.num_digits if num_digits is None else num_digits
    v: Dict[str, Any] = dict(validate_args=False)
    zeros_what = torch.zeros(D, WHAT_DIM, dtype=dtype, device=device)
    zeros_where = torch.zeros(D, 2, dtype=dtype, device=device)
    m = Model()
    m.latent("what", prior=lambda: Independent(Normal(zeros_what, 1.0, **v), 2, **v))
    m.latent("where_1", prior=lambda: Independent(Normal(zeros_where, 1.0, **v), 2, **v))
    for t in range(2, T + 1):
        m.latent(f"where_{t}", prior=lambda prev: Independent(Normal(prev, WHERE_STEP, **v), 2, **v),
                 parents=[f"where_{t - 1}"])
    for t in range(1, T + 1):
        m.observe(f"x_{t}", lambda what, where: Independent(
            Bernoulli(probs=reconstruct(decoder, what, where, cfg.canvas), **v), 2, **v),
            parents=["what", f"where_{t}"], event_dim=2)
    return m


def frames_to_data(frames: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Frames ``(*B, T, H, H)`` -> the model's data ``{"x_t": (*B, H, H)}``."""
    return {f"x_{t + 1}": frames[..., t, :, :] for t in range(frames.shape[-3])}


def log_joint(frames: torch.Tensor, what: torch.Tensor, where: torch.Tensor, decoder: DigitDecoder,
              canvas: int) -> torch.Tensor:
    """``log p_theta(x, z)`` written out by hand (the reference the declared model is tested against).

    ``frames (..., T, H, H)``, ``what (..., D, 10)``, ``where (..., D, T, 2)`` -> ``(...)``.
    """
    lp_what = Normal(0.0, 1.0).log_prob(what).sum((-2, -1))
    lp_where = Normal(0.0, 1.0).log_prob(where[..., 0, :]).sum((-2, -1))
    steps = where[..., 1:, :] - where[..., :-1, :]
    lp_where = lp_where + (-0.5 * (steps / WHERE_STEP) ** 2 - math.log(WHERE_STEP)
                           - 0.5 * math.log(2 * math.pi)).sum((-3, -2, -1))
    probs = reconstruct(decoder, what.unsqueeze(-3), where.transpose(-2, -3), canvas)  # (..., T, H, H)
    lp_x = (frames * probs.log() + (1 - frames) * (1 - probs).log()).sum((-3, -2, -1))
    return lp_what + lp_where + lp_x


class BMNISTDensity:
    """``log p_theta(x, z)`` and the Markov blankets of the blocks ``what`` and ``where_t``.

    From `tmcgraph.JointDensity` of `bmnist_model` (one per T, D, dtype and device).
    """

    def __init__(self, cfg: BMNISTConfig, decoder: DigitDecoder) -> None:
        self.cfg, self.decoder = cfg, decoder
        self._cache: Dict[tuple, JointDensity] = {}
        self._data: Optional[Tuple[torch.Tensor, int, Dict[str, torch.Tensor]]] = None
        self._blankets: Dict[Tuple[JointDensity, str], Tuple[str, ...]] = {}

    def _frames(self, frames: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`frames_to_data`, the same dict for the same unmodified frames.

        (so the density's data check runs once per batch, not once per blanket).
        """
        if self._data is None or self._data[0] is not frames or self._data[1] != frames._version:
            self._data = (frames, frames._version, frames_to_data(frames))
        return self._data[2]

    def density(self, num_frames: int, num_digits: int, like: torch.Tensor) -> JointDensity:
        """The `tmcgraph.JointDensity` of videos of this many frames and digits (cached per dtype and device)."""
        key = (num_frames, num_digits, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = JointDensity(bmnist_model(self.cfg, self.decoder, num_frames, num_digits,
                                                         like.dtype, like.device))
        return self._cache[key]

    @staticmethod
    def _state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{"what": (*B, L, D, 10), "where": (*B, L, D, T, 2)}`` -> the model's latents."""
        where = state["where"]
        out = {"what": state["what"]}
        out.update({f"where_{t + 1}": where[..., t, :] for t in range(where.shape[-2])})
        return out

    def log_joint(self, frames: torch.Tensor, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``frames (*B, T, H, H)``, state as `_state` -> ``(*B, L)``."""
        d = self.density(frames.shape[-3], state["what"].shape[-2], frames)
        return d.log_prob(self._state(state), self._frames(frames))

    def blanket(self, frames: torch.Tensor, state: Dict[str, torch.Tensor], variable: str) -> torch.Tensor:
        """The factors touching ``variable`` (``"what"`` or ``"where_t"``): ``(*B, L)``."""
        d = self.density(frames.shape[-3], state["what"].shape[-2], frames)
        key = (d, variable)
        if key not in self._blankets:
            self._blankets[key] = d.blanket([variable])
        return d.log_prob(self._state(state), self._frames(frames), sites=self._blankets[key])


def posterior_reconstruction(decoder: DigitDecoder, result: Result, canvas: int) -> torch.Tensor:
    """The frames' reconstruction ``(*B, T, H, H)`` under the final particles of ``result``.

    Each particle's Bernoulli means averaged with its normalised importance weight (a posterior mean; the official code
    averages resampled particles, the same in expectation).
    """
    state = result.state
    w = torch.softmax(result.log_weights, -1)  # (*B, L)
    with torch.no_grad():
        where = state["where"].transpose(-2, -3)  # (*B, L, T, D, 2)
        recon = reconstruct(decoder, state["what"].unsqueeze(-3), where, canvas)  # (*B, L, T, H, H)
    return (w[..., None, None, None] * recon).sum(-4)
