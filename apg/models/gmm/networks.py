"""The learned proposals of the GMM (Wu et al., ICML 2020, appendix E) and the RWS baselines' encoders."""

from __future__ import annotations

import math

import torch
from torch import nn
from typing_extensions import override

from ...errors import APGError
from ...proposals import NeuralCategorical, NeuralNormalGamma, NormalGammaParams
from .algebra import PAPER, GMMConfig, prior_params

__all__ = ["GMMProposals", "LSTMNormalGamma"]


class LSTMNormalGamma(nn.Module):
    """RWS-LSTM baseline encoder of the globals.

    An LSTM reads the points in order; its last hidden state gives the Normal-Gamma parameters of every cluster (no
    sufficient statistics, not permutation invariant).
    """

    def __init__(self, cfg: GMMConfig, hidden: int = 32) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4 * cfg.num_clusters * cfg.dim)

    @override
    def forward(self, x: torch.Tensor) -> NormalGammaParams:
        lead = x.shape[:-2]
        _, (h, _) = self.lstm(x.reshape((-1,) + x.shape[-2:]))
        out = self.head(h[-1]).reshape(lead + (4, self.cfg.num_clusters, self.cfg.dim))
        sp = nn.functional.softplus
        return NormalGammaParams(out[..., 0, :, :], sp(out[..., 1, :, :]) + 1e-3, sp(out[..., 2, :, :]) + 1e-3,
                                 sp(out[..., 3, :, :]) + 1e-3)


class GMMProposals(nn.Module):
    """The learned proposals of the GMM (appendix E).

    * ``oneshot``: ``q(mu, tau | x)``: neural sufficient statistics of ``x_n``
      (``encoder="mlp"``) or an LSTM over the points (``encoder="lstm"``).
    * ``globals``: ``q(mu, tau | x, c)``: neural sufficient statistics of
      ``[x_n, onehot(c_n)]`` (``None`` for the RWS baselines, ``conditional=False``).
    * ``assignments``: ``q(c | x, mu, tau)``: ``FC32 tanh -> FC1`` per (point, cluster),
      softmax over clusters, on ``features="paper"``: ``[x_n, mu_i, tau_i]`` (appendix E), or
      ``features="conjugate"``: ``[x_n - mu_i, (x_n - mu_i)^2 tau_i, log tau_i]``, in which the exact
      conditional's logit ``sum_d (log tau_id - tau_id (x_nd - mu_id)^2) / 2`` is linear.

    Args:
        cfg: model sizes and prior.
        encoder: ``"mlp"`` or ``"lstm"``.
        conditional: build the block kernel of the globals (APG).
        hidden: hidden units of the assignment MLP (and of the LSTM).
        features: the assignment network's inputs, ``"paper"`` or ``"conjugate"``.
    """

    def __init__(self, cfg: GMMConfig = PAPER, encoder: str = "mlp", conditional: bool = True,
                 hidden: int = 32, features: str = "paper") -> None:
        super().__init__()
        if encoder not in ("mlp", "lstm"):
            raise APGError(f"encoder must be 'mlp' or 'lstm', got {encoder!r}")
        if features not in ("paper", "conjugate"):
            raise APGError(f"features must be 'paper' or 'conjugate', got {features!r}")
        k, d = cfg.num_clusters, cfg.dim
        self.cfg, self.encoder, self.features = cfg, encoder, features
        self.oneshot = NeuralNormalGamma(d, k, d) if encoder == "mlp" else LSTMNormalGamma(cfg, hidden)
        self.globals = NeuralNormalGamma(d + k, k, d) if conditional else None
        self.assignments = NeuralCategorical(3 * d, hidden)

    def oneshot_params(self, x: torch.Tensor) -> NormalGammaParams:
        """``x (*B, N, D)`` -> ``q(mu, tau | x)`` parameters ``(*B, I, D)``."""
        return self.oneshot(x, prior_params(self.cfg, x)) if self.encoder == "mlp" else self.oneshot(x)

    def global_params(self, x: torch.Tensor, c: torch.Tensor) -> NormalGammaParams:
        """``x (*B, N, D)``, ``c (*B, L, N)`` -> ``q(mu, tau | x, c)`` parameters ``(*B, L, I, D)``."""
        if self.globals is None:
            raise APGError("these proposals have no conditional kernel for the globals (an RWS baseline)")
        onehot = nn.functional.one_hot(c, self.cfg.num_clusters).to(x.dtype)
        xs = x.unsqueeze(-3).expand(onehot.shape[:-1] + x.shape[-1:])
        return self.globals(torch.cat([xs, onehot], -1), prior_params(self.cfg, x))

    def assignment_logits(self, x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Normalised logits ``(*B, L, N, I)`` of ``q(c | x, mu, tau)``; ``x (*B, N, D)``, ``mu, tau (*B, L, I, D)``."""
        k = mu.shape[-2]
        prior = torch.full((k,), -math.log(k), dtype=x.dtype, device=x.device)
        if self.features == "paper":
            return self.assignments.forward_pairs(x.unsqueeze(-3), torch.cat([mu, tau], -1), prior)
        diff = x.unsqueeze(-3).unsqueeze(-2) - mu.unsqueeze(-3)  # (*B, L, N, I, D)
        tau_ = tau.unsqueeze(-3)
        features = torch.cat([diff, diff * diff * tau_, tau_.log().expand_as(diff)], -1)
        return self.assignments(features, prior)
