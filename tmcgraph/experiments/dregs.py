"""The DReGs surrogate for TMC: gradient signal-to-noise ratio against K, and proposals trained with it.

For IWAE, the reparameterised gradient of ``log P`` w.r.t. the proposal
parameters has a signal-to-noise ratio that decays like ``1/sqrt(K)`` (Rainforth
et al., ICML 2018), and DReGs removes the decay (Tucker et al., ICLR 2019).
This experiment measures the same for TMC (Aitchison, NeurIPS 2019, appendix F)
on a plated global/local linear-Gaussian model, for three gradients of the
proposal parameters:

* ``reparameterised``: the gradient of `TMC.log_marginal` (unbiased);
* ``dregs``: `TMC.dregs_surrogate` (per-sample weights; unbiased);
* ``dregs-paper``: the paper's eq. 54/60, ``form="paper"`` (biased for more
  than one latent).

Model: ``mu ~ N(0, 1)``, ``z_n ~ N(mu, 1)``, ``x_n ~ N(z_n, noise^2)``, with
factorised proposals ``q(mu) = N(a, e^s)`` and ``q(z_n) = N(b_n, e^{t_n})``.
Everything is closed form: ``log p(x)`` and the posterior marginals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.distributions import MultivariateNormal, Normal

from ..estimators import TMC
from ..model import Model

__all__ = ["GlobalLocalProblem", "global_local_problem", "dregs_snr", "dregs_training", "dregs_experiment",
           "GRADIENTS"]

#: gradient name -> objective whose gradient w.r.t. the proposal parameters it is
GRADIENTS: Dict[str, Callable[[TMC, Dict[str, torch.Tensor]], torch.Tensor]] = {
    "reparameterised": lambda est, data: est.log_marginal(data),
    "dregs": lambda est, data: est.dregs_surrogate(data),
    "dregs-paper": lambda est, data: est.dregs_surrogate(data, form="paper"),
}


@dataclass
class GlobalLocalProblem:
    """Data and closed-form answers of the global/local model.

    Attributes:
        x: ``(N,)`` float64 data drawn from the model.
        noise: observation standard deviation.
        exact: ``log p(x)``: ``x ~ N(0, 1 1^T + (1 + noise^2) I)``.
        mu_mean, mu_sd: posterior mean and sd of ``mu`` (floats).
        z_mean, z_sd: ``(N,)`` posterior marginal means and sds of ``z_n``.
    """

    x: torch.Tensor
    noise: float
    exact: float
    mu_mean: float
    mu_sd: float
    z_mean: torch.Tensor
    z_sd: torch.Tensor

    @property
    def N(self) -> int:
        """The number of data points."""
        return int(self.x.shape[0])


def global_local_problem(N: int = 8, *, noise: float = 0.5, seed: int = 0) -> GlobalLocalProblem:
    """Draw ``x`` from the model (float64, from ``seed``) and compute the closed-form answers."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn((), generator=g, dtype=torch.float64)
    z = mu + torch.randn(N, generator=g, dtype=torch.float64)
    x = z + noise * torch.randn(N, generator=g, dtype=torch.float64)
    v = 1.0 + noise**2  # x_n | mu ~ N(mu, v)
    cov = torch.ones(N, N, dtype=torch.float64) + v * torch.eye(N, dtype=torch.float64)
    exact = MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(x).item()
    mu_var = 1.0 / (1.0 + N / v)
    mu_mean = mu_var * x.sum().item() / v
    # z_n | mu, x_n ~ N((mu + x_n / noise^2) * c, c) with c = 1 / (1 + 1 / noise^2); then average over mu
    c = 1.0 / (1.0 + 1.0 / noise**2)
    z_mean = (mu_mean + x / noise**2) * c
    z_sd = torch.sqrt(torch.full((N,), c + c * c * mu_var, dtype=torch.float64))
    return GlobalLocalProblem(x, noise, exact, mu_mean, math.sqrt(mu_var), z_mean, z_sd)


class _Proposals(torch.nn.Module):
    """Factorised Normal proposals with one independent copy per draw (leading dim ``draws``)."""

    def __init__(self, draws: int, mu_loc: float, mu_sd: float, z_loc: torch.Tensor, z_sd: torch.Tensor) -> None:
        super().__init__()
        N = z_loc.shape[0]
        self.mu_loc = torch.nn.Parameter(torch.full((draws,), float(mu_loc)))
        self.mu_log_scale = torch.nn.Parameter(torch.full((draws,), math.log(mu_sd)))
        self.z_loc = torch.nn.Parameter(z_loc.float().expand(draws, N).clone())
        self.z_log_scale = torch.nn.Parameter(z_sd.float().log().expand(draws, N).clone())

    def groups(self) -> Dict[str, torch.nn.Parameter]:
        return {"mu_loc": self.mu_loc, "mu_log_scale": self.mu_log_scale, "z_loc": self.z_loc,
                "z_log_scale": self.z_log_scale}


def _model(problem: GlobalLocalProblem, q: _Proposals) -> Model:
    """The model with the proposals of ``q``; layout ``(draws, index mu, index z, plate N)``."""
    draws, N = q.z_loc.shape
    m = Model()
    m.plate("N", N)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0),
             proposal=lambda: Normal(q.mu_loc.reshape(draws, 1, 1, 1), q.mu_log_scale.exp().reshape(draws, 1, 1, 1)))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"],
             proposal=lambda: Normal(q.z_loc.reshape(draws, 1, 1, N), q.z_log_scale.exp().reshape(draws, 1, 1, N)))
    m.observe("x", lambda z: Normal(z, problem.noise), plates=["N"])
    return m


def _data(problem: GlobalLocalProblem, draws: int) -> Dict[str, torch.Tensor]:
    return {"x": problem.x.float().expand(draws, problem.N)}


def dregs_snr(problem: GlobalLocalProblem, Ks: List[int], *, draws: int = 2000, at: float = 0.5, seed: int = 0,
              progress: bool = False) -> List[Dict[str, Any]]:
    """Signal-to-noise ratio ``|E[g]| / sd(g)`` of each gradient, per K.

    The proposals' means and log-sds sit a fraction ``at`` of the way from the
    prior ``N(0, 1)`` (0) to the exact posterior marginals (1): a point on the
    way of training, where the gradient has signal (at the optimum ``E[g]`` is
    zero and so is every SNR).  ``draws`` independent gradients are drawn at
    once (every parameter has one copy per draw).  The SNR of each parameter is
    averaged within its group (``mu_loc``, ``mu_log_scale``, ``z_loc``,
    ``z_log_scale``).

    Returns:
        one row per (K, gradient): ``{"K", "gradient", "snr": {group: value},
        "mean_norm": Euclidean norm of the mean gradient over all parameters}``.
        A biased gradient can have a high SNR around the wrong mean; compare
        ``mean_norm`` across gradients (the unbiased ones agree).
    """
    from tqdm.auto import tqdm

    at_params = (at * problem.mu_mean, math.exp(at * math.log(problem.mu_sd)), at * problem.z_mean,
                 torch.exp(at * problem.z_sd.log()))
    rows: List[Dict[str, Any]] = []
    jobs = [(K, name) for K in Ks for name in GRADIENTS]
    for K, name in tqdm(jobs, disable=not progress, desc="dregs snr"):
        q = _Proposals(draws, *at_params)
        est = _model(problem, q).compile(K=K)
        torch.manual_seed(seed)
        value = GRADIENTS[name](est, _data(problem, draws))
        groups = q.groups()
        grads = torch.autograd.grad(value.sum(), list(groups.values()))
        snr, means = {}, []
        for group, g in zip(groups, grads):
            g = g.double().reshape(draws, -1)
            m, sd = g.mean(0), g.std(0)
            snr[group] = (m.abs() / sd).mean().item()
            means.append(m)
        rows.append({"K": K, "gradient": name, "snr": snr, "mean_norm": torch.cat(means).norm().item()})
    return rows


def dregs_training(problem: GlobalLocalProblem, *, K: int = 8, steps: int = 600, batch: int = 16, lr: float = 0.02,
                   eval_every: int = 100, eval_draws: int = 2000, seed: int = 0,
                   progress: bool = False) -> Dict[str, List[Dict[str, float]]]:
    """Train the proposals (from the prior, ``N(0, 1)`` everywhere) with Adam on each gradient.

    Each step averages ``batch`` independent gradients.  Every ``eval_every``
    steps, ``E[log P_TMC]`` at the same K is estimated from ``eval_draws`` draws.

    Returns:
        gradient name -> ``[{"step", "log_marginal", "log_marginal_se"}, ...]``.
    """
    from tqdm.auto import tqdm

    N = problem.N
    out: Dict[str, List[Dict[str, float]]] = {}
    for name, objective in GRADIENTS.items():
        torch.manual_seed(seed)
        q = _Proposals(1, 0.0, 1.0, torch.zeros(N), torch.ones(N))
        est = _model(problem, q).compile(K=K)
        opt = torch.optim.Adam(q.parameters(), lr=lr)
        curve: List[Dict[str, float]] = []
        for step in tqdm(range(steps + 1), disable=not progress, desc=f"train {name}"):
            if step % eval_every == 0 or step == steps:
                curve.append({"step": step, **_evaluate(problem, q, K, eval_draws)})
            if step == steps:
                break
            opt.zero_grad()
            loss = -objective(est, _data(problem, batch)).mean()
            loss.backward()
            opt.step()
        out[name] = curve
    return out


def _evaluate(problem: GlobalLocalProblem, q: _Proposals, K: int, draws: int) -> Dict[str, float]:
    """``E[log P_TMC]`` and its standard error for the single-copy proposals ``q``."""
    with torch.no_grad():
        copy = _Proposals(draws, 0.0, 1.0, torch.zeros(problem.N), torch.ones(problem.N))
        for name, p in copy.groups().items():
            p.copy_(q.groups()[name].expand_as(p))
        values = _model(problem, copy).compile(K=K).log_marginal(_data(problem, draws)).double()
    return {"log_marginal": values.mean().item(), "log_marginal_se": (values.std() / math.sqrt(draws)).item()}


def dregs_experiment(*, N: int = 8, noise: float = 0.5, seed: int = 0, Ks: Optional[List[int]] = None,
                     draws: int = 2000, at: float = 0.5, K: int = 8, steps: int = 600, batch: int = 16,
                     lr: float = 0.02, eval_every: int = 100, eval_draws: int = 2000,
                     progress: bool = False) -> Dict[str, Any]:
    """SNR against K and training curves, with the problem's settings and exact ``log p(x)``."""
    problem = global_local_problem(N, noise=noise, seed=seed)
    Ks = Ks or [1, 2, 4, 8, 16, 32, 64]
    return {
        "settings": {"N": N, "noise": noise, "seed": seed, "draws": draws, "at": at, "K": K, "steps": steps,
                     "batch": batch, "lr": lr, "eval_draws": eval_draws},
        "exact": problem.exact,
        "snr": dregs_snr(problem, Ks, draws=draws, at=at, seed=seed, progress=progress),
        "training": dregs_training(problem, K=K, steps=steps, batch=batch, lr=lr, eval_every=eval_every,
                                   eval_draws=eval_draws, seed=seed, progress=progress),
    }
