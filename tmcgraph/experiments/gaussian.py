"""Fig. 7 of the TMC paper: TMC, SMC and IWAE against the Kalman filter on a linear-Gaussian chain.

The functions return plain dicts of numbers; `tmcgraph.cli` prints, plots
and serialises them.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
from torch.distributions import Normal

from ..estimators import iwae, smc
from ..model import Model

__all__ = ["chain_model", "chain_data", "kalman_log_marginal", "gaussian_point", "gaussian_experiment"]


def chain_model(N: int, *, a: float = 0.9, obs_sd: float = 1.0) -> Model:
    """z_1 ~ N(0,1), z_t ~ N(a z_{t-1}, 1 - a^2), x_t ~ N(z_t, obs_sd^2).

    Every z_t has marginal N(0, 1), which is the (factorised) proposal used by
    TMC and IWAE; SMC's bootstrap proposal is the transition.
    """
    m = Model()
    sd = math.sqrt(1 - a * a)
    m.latent("z0", prior=lambda: Normal(0.0, 1.0))
    with m.batch_sites():  # these functions broadcast over leading dims: TMC evaluates each loop in one call
        for t in range(1, N):
            m.latent(f"z{t}", prior=lambda prev: Normal(a * prev, sd), proposal=lambda: Normal(0.0, 1.0),
                     parents=[f"z{t - 1}"], proposal_parents=[])
        for t in range(N):
            m.observe(f"x{t}", lambda z: Normal(z, obs_sd), parents=[f"z{t}"])
    return m


def kalman_log_marginal(x: torch.Tensor, *, a: float = 0.9, obs_sd: float = 1.0) -> float:
    """Exact log p(x_1..x_N) of `chain_model` by Kalman filtering (float64)."""
    q, r = 1 - a * a, obs_sd**2
    mean, var, total = 0.0, 1.0, 0.0
    for t, xt in enumerate(x.double().tolist()):
        if t:
            mean, var = a * mean, a * a * var + q
        s = var + r
        total += -0.5 * (math.log(2 * math.pi * s) + (xt - mean) ** 2 / s)
        gain = var / s
        mean, var = mean + gain * (xt - mean), (1 - gain) * var
    return total


def chain_data(N: int, *, seed: int, a: float = 0.9, obs_sd: float = 1.0) -> torch.Tensor:
    """``N`` observations ``(N,)`` of the linear-Gaussian chain, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(N, dtype=torch.float64)
    z[0] = torch.randn((), generator=g, dtype=torch.float64)
    for t in range(1, N):
        z[t] = a * z[t - 1] + math.sqrt(1 - a * a) * torch.randn((), generator=g, dtype=torch.float64)
    return z + obs_sd * torch.randn(N, generator=g, dtype=torch.float64)


def _timed(fn, repeats: int):
    """Mean value and median seconds of ``repeats`` calls, after one untimed warm-up call."""
    fn()
    values, times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        values.append(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return sum(values) / len(values), times[len(times) // 2]


def gaussian_point(N: int, K: int, *, seed: int, repeats: int = 3) -> Dict[str, float]:
    """TMC, SMC and IWAE vs the Kalman ground truth at one (N, K).

    Estimates are means over ``repeats`` runs; times are medians (seconds).
    """
    torch.manual_seed(seed)
    x = chain_data(N, seed=seed)
    model = chain_model(N)
    data = {f"x{t}": x[t].float() for t in range(N)}
    est = model.compile(K=K)
    with torch.no_grad():
        tmc, tmc_s = _timed(lambda: est.log_marginal(data).item(), repeats)
        smc_v, smc_s = _timed(lambda: smc(model, data, K).item(), repeats)
        iw, iw_s = _timed(lambda: iwae(model, data, K).item(), repeats)
    return {"N": N, "K": K, "exact": kalman_log_marginal(x), "tmc": tmc, "tmc_seconds": tmc_s,
            "smc": smc_v, "smc_seconds": smc_s, "iwae": iw, "iwae_seconds": iw_s, "treewidth": est.plan.treewidth}


def gaussian_experiment(*, N: int = 128, K: int = 128, Ks: Optional[List[int]] = None,
                        Ns: Optional[List[int]] = None, seed: int = 0, repeats: int = 3,
                        progress: bool = False) -> Dict[str, List[Dict[str, float]]]:
    """Fig. 7: estimates and times against K at fixed N, and against N at fixed K."""
    from tqdm.auto import tqdm

    Ks = Ks or [2, 4, 8, 16, 32, 64, 128]
    Ns = Ns or [8, 16, 32, 64, 128]
    jobs = [("vs_K", N, k) for k in Ks] + [("vs_N", n, K) for n in Ns]
    out: Dict[str, List[Dict[str, float]]] = {"vs_K": [], "vs_N": []}
    for key, n, k in tqdm(jobs, disable=not progress, desc="gaussian"):
        out[key].append(gaussian_point(n, k, seed=seed, repeats=repeats))
    return out
