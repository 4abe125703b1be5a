"""Appendix H of the TMC paper: TMC against IWAE on a random sparse linear-Gaussian model.

The functions return plain dicts of numbers; `tmcgraph.cli` prints, plots
and serialises them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch.distributions import MultivariateNormal, Normal

from ..estimators import iwae
from ..model import Model

__all__ = ["SparseProblem", "sparse_problem", "sparse_model", "sparse_data", "treewidth_experiment"]


@dataclass
class SparseProblem:
    """z_j ~ N(0, 1) (j < N), x_i ~ N(sum_j C_ij z_j, noise^2) (i < N), C_ij ~ Bernoulli(p).

    Attributes:
        C: ``(N, N)`` 0/1 float64 matrix.
        x: ``(N,)`` float64 data drawn from the model.
        noise: observation standard deviation.
        exact: log p(x) in closed form: ``x ~ N(0, C C^T + noise^2 I)``.
    """

    C: torch.Tensor
    x: torch.Tensor
    noise: float
    exact: float

    @property
    def max_parents(self) -> int:
        """The largest number of parents of any latent."""
        return int(self.C.sum(1).max().item())


def sparse_problem(N: int = 100, p: float = 0.01, *, seed: int = 0, noise: float = 0.1) -> SparseProblem:
    """Draw C and x for appendix H (float64, from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    C = (torch.rand(N, N, generator=g, dtype=torch.float64) < p).double()
    z = torch.randn(N, generator=g, dtype=torch.float64)
    x = C @ z + noise * torch.randn(N, generator=g, dtype=torch.float64)
    cov = C @ C.T + noise**2 * torch.eye(N, dtype=torch.float64)
    exact = MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(x).item()
    return SparseProblem(C, x, noise, exact)


def sparse_model(problem: SparseProblem, dtype: torch.dtype = torch.float32, *, batch: str = "no") -> Model:
    """The appendix H model: one latent per column, one observation per row; proposal = prior.

    ``batch``: ``"no"`` declares the sites one by one; ``"verify"`` / ``"trust"`` declares them in
    `Model.batch_sites` with ``verify=True`` / ``False`` (the likelihoods of observations with the
    same number of parents are then evaluated in one call).
    """
    m = Model()
    zero, one = torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    N = problem.C.shape[1]
    with m.batch_sites(verify=batch == "verify") if batch != "no" else contextlib.nullcontext():
        for j in range(N):
            m.latent(f"z{j}", prior=lambda: Normal(zero, one))
        for i in range(problem.C.shape[0]):
            parents = [f"z{j}" for j in torch.nonzero(problem.C[i]).flatten().tolist()]
            m.observe(f"x{i}", lambda *zs: Normal(sum(zs, zero), problem.noise), parents=parents)
    return m


def sparse_data(problem: SparseProblem, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The problem's observations as model data, in ``dtype``."""
    return {f"x{i}": problem.x[i].to(dtype) for i in range(problem.x.shape[0])}


def treewidth_experiment(*, N: int = 100, p: float = 0.01, seed: int = 0, K: int = 64,
                         iwae_samples: int = 2**24, chunk_size: int = 2**18, noise: float = 0.1,
                         max_factor: int = 2**26, max_flops: float = 2e10,
                         progress: bool = False) -> Dict[str, Any]:
    """Appendix H: TMC with K samples per latent vs IWAE with a large joint-sample budget.

    Returns:
        dict with ``treewidth``, ``exact``, ``tmc``, ``tmc_seconds`` (sampling,
        factors, contraction; the compile is ``compile_seconds``), ``iwae``,
        ``iwae_seconds``, ``K``, ``iwae_samples``, ``N``, ``p``, ``seed``,
        ``max_parents``, ``tmc_flops``.  ``tmc`` is None (skipped) when an observation
        has so many parents that its factor (K ** parents entries) exceeds
        ``max_factor``, or the contraction exceeds ``max_flops``.
    """
    torch.manual_seed(seed)
    problem = sparse_problem(N, p, seed=seed, noise=noise)
    model = sparse_model(problem)
    data = sparse_data(problem)
    out: Dict[str, Any] = {"N": N, "p": p, "seed": seed, "K": K, "iwae_samples": iwae_samples,
                              "exact": problem.exact, "max_parents": problem.max_parents}
    start = time.perf_counter()
    est = model.compile(K=K)
    out["compile_seconds"] = time.perf_counter() - start
    out["treewidth"] = est.plan.treewidth
    out["tmc_flops"] = est.plan.flops
    if K ** problem.max_parents > max_factor or est.plan.flops > max_flops:
        out["tmc"], out["tmc_seconds"] = None, None
    else:
        with torch.no_grad():
            start = time.perf_counter()
            out["tmc"] = est.log_marginal(data).item()
            out["tmc_seconds"] = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        out["iwae"] = iwae(model, data, iwae_samples, chunk_size=chunk_size, progress=progress).item()
        out["iwae_seconds"] = time.perf_counter() - start
    return out

