"""Importance weighting with joint samples (IWAE): every sampled latent shares one particle index."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..declaration import ModelBase as Model
from ..errors import TMCError
from .base import PARTICLES, GraphEstimator, check_k, enumerated_size

__all__ = ["IWAE", "iwae"]


class IWAE(GraphEstimator):
    """Importance weighting with joint samples.

    Every sampled latent shares one particle index of size K; enumerated latents are still summed exactly.
    """

    def __init__(self, model: Model, K: int, *, optimize: str = "auto") -> None:
        latents = model.latents()
        K = check_k("(all)", K)
        index_of = {n: (n if model.sites[n].enumerate else PARTICLES) for n in latents}
        sizes: Dict[str, Optional[int]] = {}
        plates: Dict[str, Tuple[str, ...]] = {}
        if any(not model.sites[n].enumerate for n in latents):
            sizes[PARTICLES], plates[PARTICLES] = K, ()
        for n in latents:
            if model.sites[n].enumerate:
                sizes[n], plates[n] = enumerated_size(model, n), model.sites[n].plates
        self._enumerates = any(model.sites[n].enumerate for n in latents)
        super().__init__(model, index_of, sizes, plates, optimize=optimize, memory_limit=None,
                         compile_now=self._enumerates)
        self.K = K

    def _sampled_indices(self) -> set:
        return {PARTICLES}

    def log_marginal(self, data: Mapping[str, object]) -> torch.Tensor:
        """``log 1/K sum_k w_k`` over K joint samples; ``(*batch,)``, differentiable."""
        if self._enumerates:
            tr, plan, norm = self._trace(data)
            return self.evaluator.log_sum(plan, tr.factors) - norm
        tr, graph, norm = self._trace_only(data)
        # nothing enumerated: log w_k is the sum of all factors (plates summed), no contraction needed
        log_w: Optional[torch.Tensor] = None
        for name, f in tr.factors.items():
            spec = graph.factors[name]
            n_pl, n_ix = len(spec.plates), len(spec.indices)
            if n_pl:
                f = f.sum(dim=tuple(range(f.dim() - n_pl - n_ix, f.dim() - n_ix)))
            if not n_ix:  # a factor with no latent parent: constant over particles
                f = f.unsqueeze(-1)
            log_w = f if log_w is None else log_w + f
        assert log_w is not None  # a model has at least one latent, hence one factor
        if bool(torch.isnan(log_w).any()):
            bad = [n for n, f in tr.factors.items() if bool(torch.isnan(f).any())]
            raise TMCError(f"log-density of {bad} contains NaN")
        return torch.logsumexp(log_w, dim=-1) - norm


def iwae(model: Model, data: Mapping[str, object], K: int, *, chunk_size: Optional[int] = None,
         progress: bool = False) -> torch.Tensor:
    """The importance-weighted estimate ``log 1/K sum_k p(x, z^k) / q(z^k)`` with K joint samples.

    Each joint sample draws every latent from its proposal given the same
    sample's parents (no mixture); enumerated latents are summed exactly.

    Args:
        model: the model.
        data: observation name -> value ``(*batch, *plates, *event)``.
        K: number of joint samples.
        chunk_size: draw and weigh at most this many samples at a time (bounded
            memory for very large K; chunks are combined in the log domain).
        progress: show a tqdm progress bar over the chunks.

    Returns:
        tensor ``(*batch,)``, differentiable.
    """
    K = check_k("(all)", K)
    if chunk_size is None or chunk_size >= K:
        return IWAE(model, K).log_marginal(data)
    chunk_size = check_k("(chunk_size)", chunk_size)
    from tqdm.auto import tqdm

    parts = []
    for start in tqdm(range(0, K, chunk_size), disable=not progress, desc="iwae chunks", unit="chunk"):
        k = min(chunk_size, K - start)
        parts.append(IWAE(model, k).log_marginal(data) + math.log(k))
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(K)
