"""The samplers the APG paper compares its GMM sampler to, sweep by sweep (Wu et al., ICML 2020, section 5.1).

Every one starts from the same one-shot proposal (the trained APG networks' ``q(mu, tau, c | x)``) and
records ``log p(x, mu, tau, c)`` after each sweep, so their convergence can be drawn against sweeps:

* `gibbs_chains`: the exact blocked Gibbs sampler, ``L`` independent chains (no weights, no resampling):
  ``(mu, tau) ~ p(mu, tau | x, c)``, then ``c ~ p(c | x, mu, tau)``.
* `hmc_chains`: HMC-RWS, ``L`` independent chains of Hamiltonian Monte Carlo on ``(mu, log tau)`` with the
  assignments summed out (`log_marginal`), one Metropolis-corrected trajectory of ``leapfrog`` steps per
  sweep; the assignments are then drawn from their exact conditional to score the log joint.
* `bpg_sampler`: bootstrapped population Gibbs, the APG sampler whose ``{mu, tau}`` kernel is the prior
  (its incremental weight is the likelihood ratio), with the learned assignment kernel
  (`bootstrap_sampler` builds one from any one-shot proposal and assignment kernel).

The official code records the prior's log-density where BPG's log joint belongs; here every sampler is
scored by the same log joint.

Shapes: data ``x (*B, N, D)``; states ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``; log joints ``(*B, L)``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from ...errors import APGError
from ...proposals import NormalGammaParams
from ...sampler import Sampler
from .algebra import (
    GMMConfig,
    assignment_logits,
    global_posterior,
    log_joint,
    normal_gamma_log_prob,
    prior_params,
    sample_categorical,
    sample_normal_gamma,
)
from .model import _sampler
from .networks import GMMProposals

__all__ = ["bootstrap_sampler", "bpg_sampler", "gibbs_chains", "hmc_chains", "log_marginal"]

State = Dict[str, torch.Tensor]


def gibbs_chains(x: torch.Tensor, state: State, num_sweeps: int, cfg: GMMConfig, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``num_sweeps`` exact blocked Gibbs sweeps of each chain in ``state``.

    Args:
        x: ``(*B, N, D)``.
        state: the chains' start, ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
        num_sweeps: sweeps (each updates ``{mu, tau}`` then ``{c}``).
        cfg: the model.
        generator: the random stream.

    Returns:
        ``(num_sweeps, *B, L)``: ``log p(x, z)`` after each sweep.
    """
    xs = x.unsqueeze(-3)
    c = state["c"]
    trace = []
    for _ in range(num_sweeps):
        mu, tau = sample_normal_gamma(global_posterior(xs, c, cfg), (), generator)
        c = sample_categorical(assignment_logits(xs, mu, tau), generator)
        trace.append(log_joint(xs, mu, tau, c, cfg))
    return torch.stack(trace)


def log_marginal(x: torch.Tensor, mu: torch.Tensor, log_tau: torch.Tensor, cfg: GMMConfig) -> torch.Tensor:
    """``log p(x, mu, log tau)`` with the assignments summed out: ``(*B, L)``.

    ``x (*B, N, D)``, ``mu, log_tau (*B, L, I, D)``; the density is over ``log tau`` (it includes the Jacobian
    ``sum log tau``).
    """
    tau = log_tau.exp()
    logits = assignment_logits(x.unsqueeze(-3), mu, tau)  # (*B, L, N, I)
    mixture = logits.logsumexp(-1).sum(-1) - x.shape[-2] * math.log(cfg.num_clusters)
    return normal_gamma_log_prob(mu, tau, prior_params(cfg, x)) + log_tau.sum((-2, -1)) + mixture


def _log_p_and_grad(x: torch.Tensor, q: Tuple[torch.Tensor, torch.Tensor],
                    cfg: GMMConfig) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    with torch.enable_grad():
        mu, log_tau = (t.detach().requires_grad_(True) for t in q)
        lp = log_marginal(x, mu, log_tau, cfg)
        g_mu, g_lt = torch.autograd.grad(lp.sum(), (mu, log_tau))
    return lp.detach(), (g_mu, g_lt)


def hmc_chains(x: torch.Tensor, state: State, num_sweeps: int, cfg: GMMConfig, *, step_size: float = 0.1,
               leapfrog: int = 5, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """HMC-RWS: ``num_sweeps - 1`` HMC transitions of each chain in ``state`` (sweep 1 is the start).

    Each transition draws a unit-Normal momentum, runs ``leapfrog`` leapfrog steps of ``step_size`` on
    ``(mu, log tau)`` under `log_marginal`, and accepts the end point per chain with probability
    ``min(1, exp(-delta H))``; the assignments are then drawn from ``p(c | x, mu, tau)`` to score the
    log joint.

    Returns:
        ``(log_joint (num_sweeps, *B, L), acceptance (*B, L))``: ``log p(x, z)`` after each sweep (the
        first: the start), and each chain's fraction of accepted transitions.
    """
    if step_size <= 0 or leapfrog < 1:
        raise APGError(f"HMC needs step_size > 0 and leapfrog >= 1, got {step_size} and {leapfrog}")
    xs = x.unsqueeze(-3)
    mu, log_tau = state["mu"], state["tau"].log()
    trace = [log_joint(xs, mu, log_tau.exp(), state["c"], cfg)]
    accepted = torch.zeros(trace[0].shape, dtype=x.dtype, device=x.device)
    lp, grad = _log_p_and_grad(x, (mu, log_tau), cfg)
    for _ in range(num_sweeps - 1):
        r = [torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator) for t in (mu, log_tau)]
        h0 = lp - 0.5 * sum((ri * ri).sum((-2, -1)) for ri in r)
        q, lp_new, g = [mu, log_tau], lp, grad
        for _ in range(leapfrog):
            r = [ri + 0.5 * step_size * gi for ri, gi in zip(r, g)]
            q = [qi + step_size * ri for qi, ri in zip(q, r)]
            lp_new, g = _log_p_and_grad(x, (q[0], q[1]), cfg)
            r = [ri + 0.5 * step_size * gi for ri, gi in zip(r, g)]
        h1 = lp_new - 0.5 * sum((ri * ri).sum((-2, -1)) for ri in r)
        u = torch.rand(h0.shape, dtype=h0.dtype, device=h0.device, generator=generator)
        accept = (u.log() < h1 - h0) & torch.isfinite(h1)  # a diverged trajectory (nan, inf) is rejected
        keep = accept[..., None, None]
        mu, log_tau = torch.where(keep, q[0], mu), torch.where(keep, q[1], log_tau)
        lp = torch.where(accept, lp_new, lp)
        grad = (torch.where(keep, g[0], grad[0]), torch.where(keep, g[1], grad[1]))
        accepted += accept.to(accepted.dtype)
        tau = log_tau.exp()
        c = sample_categorical(assignment_logits(xs, mu, tau), generator)
        trace.append(log_joint(xs, mu, tau, c, cfg))
    return torch.stack(trace), accepted / max(1, num_sweeps - 1)


def bootstrap_sampler(oneshot_params: Callable[[torch.Tensor], NormalGammaParams],
                      assignment_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      cfg: GMMConfig, normalized: bool = False) -> Sampler:
    """A population Gibbs sampler whose ``{mu, tau}`` kernel is the prior.

    Args:
        oneshot_params: ``x (*B, N, D)`` -> Normal-Gamma parameters ``(*B, I, D)`` of the one-shot proposal.
        assignment_logits: ``(x (*B, N, D), mu, tau (*B, L, I, D))`` -> logits ``(*B, L, N, I)`` of the
            assignment kernel.
        cfg: the model.
        normalized: the logits are already log-probabilities.

    Proposing the globals from the prior makes their incremental weight the likelihood ratio
    ``p(x | c, mu', tau') / p(x | c, mu, tau)``; the sampler resamples before each block, as APG does.
    """

    def prior(x: torch.Tensor, c: torch.Tensor) -> NormalGammaParams:
        return NormalGammaParams(*(t.expand(c.shape[:-1] + t.shape) for t in prior_params(cfg, x)))

    return _sampler(oneshot_params, prior, assignment_logits, cfg, normalized=normalized)


def bpg_sampler(nets: GMMProposals) -> Sampler:
    """Bootstrapped population Gibbs (`bootstrap_sampler`) with ``nets``' one-shot proposal and assignment kernel."""
    if nets.globals is None:
        raise APGError("BPG takes its assignment kernel from APG networks; these are one-shot (RWS) networks")
    return bootstrap_sampler(nets.oneshot_params, nets.assignment_logits, nets.cfg, normalized=True)
