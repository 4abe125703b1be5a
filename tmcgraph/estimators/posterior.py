"""Posterior summaries of one TMC draw: marginal weights over samples, means, backward sampling."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Dict, Mapping, Optional

import torch

from ..declaration import ModelBase as Model
from ..errors import TMCError
from ..layout import factor_indices
from ..plan import Plan
from ..trace import Trace

__all__ = ["Posterior"]


class Posterior:
    """Posterior summaries of one TMC draw (built by `TMC.posterior`).

    Attributes:
        log_marginal: ``(*batch,)`` log P_TMC of this draw.
        samples: latent -> ``(*batch, *plates, K, *event)`` its samples.
        marginals: latent -> ``(*batch, *plates, K)`` posterior probability of
            each sample (the gradient of ``log P_TMC`` with respect to the
            latent's log-factor, summed over the other indices); sums to 1
            over K.
    """

    def __init__(self, model: "Model", tr: Trace, plan: Plan, norm: float,
                 log_sum: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                 rng: Optional[Callable[[str], ContextManager[object]]] = None) -> None:
        """One draw ``tr`` of ``model`` contracted by ``plan``.

        ``log_sum(factors)`` is the estimator's contraction of factors laid out as ``tr``'s (all-reduced when sharded),
        ``rng(latent)`` its random stream for a latent (sharded TMC), ``norm`` its log-normaliser.
        """
        self._model, self._trace, self._log_sum, self._rng = model, tr, log_sum, rng
        layout = tr.layout
        batch = layout.batch
        core = {s.name: len(s.shape) for s in plan.inputs}
        self._fac = {n: f.detach().expand(batch + tuple(f.shape[f.dim() - core[n]:])) for n, f in tr.factors.items()}
        leaves = {n: f.clone().requires_grad_() for n, f in self._fac.items()}
        with torch.enable_grad():
            total = log_sum(leaves)
            if not bool(torch.isfinite(total).all()):
                raise TMCError("every sample combination has zero weight (log P_TMC = -inf) for some batch element; "
                               "the posterior over samples is undefined")
            grads = torch.autograd.grad(total.sum(), [leaves[n] for n in model.latents()])
        self.log_marginal = total.detach() - norm
        self.samples: Dict[str, torch.Tensor] = {}
        self.marginals: Dict[str, torch.Tensor] = {}
        self._event: Dict[str, int] = {}
        for n, g in zip(model.latents(), grads):
            extra = len(factor_indices(model, layout.index_of, n)) - 1
            w = g.sum(dim=tuple(range(g.dim() - extra, g.dim()))) if extra else g
            self.marginals[n] = w
            self._event[n] = tr.event_dims[n]
            self.samples[n] = layout.site_view(tr.values[n].detach(), n, tr.event_dims[n])

    def mean(self, name: str, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Posterior expectation ``E[fn(z)]`` of latent ``name`` per plate element.

        Args:
            name: a latent.
            fn: applied to samples ``(*batch, *plates, K, *event)``, returning
                ``(*batch, *plates, K, *out)``; default identity.

        Returns:
            ``(*batch, *plates, *out)``.
        """
        if name not in self.marginals:
            raise TMCError(f"{name!r} is not a latent; latents: {list(self.marginals)}")
        v = self.samples[name]
        if fn is not None:
            v = fn(v)
        w = self.marginals[name]
        extra = v.dim() - w.dim()
        return (w.reshape(tuple(w.shape) + (1,) * extra).to(v.dtype) * v).sum(dim=w.dim() - 1)

    def sample(self, num_samples: int) -> Dict[str, torch.Tensor]:
        """Importance samples drawn through the contraction (backward sampling).

        Draws ``num_samples`` joint index assignments from the TMC posterior over
        sample indices (probability proportional to the product of factors),
        latent by latent: each latent's copies are drawn from their marginals
        conditioned on the latents drawn before (fewer plates first), by one
        contraction with the earlier choices clamped.

        Returns:
            latent -> ``(num_samples, *batch, *plates, *event)`` values, and
            ``"@index:<latent>"`` -> ``(num_samples, *batch, *plates)`` indices.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise TMCError(f"num_samples must be a positive int, got {num_samples!r}")
        model = self._model
        topo = {n: k for k, n in enumerate(model.latents())}
        order = sorted(topo, key=lambda n: (len(model.sites[n].plates), topo[n]))
        # a sample dim of size 1 broadcasts: only the factors of latents already drawn (clamped) carry the
        # num_samples dim, so the steps that touch none of them (a big plate product, say) run once, not N times
        fac = {n: f.unsqueeze(0) for n, f in self._fac.items()}
        out: Dict[str, torch.Tensor] = {}
        for n in order:
            extra = len(factor_indices(model, self._trace.layout.index_of, n)) - 1
            leaf = fac[n].expand((num_samples,) + tuple(fac[n].shape[1:])).clone().requires_grad_()
            with torch.enable_grad():
                total = self._log_sum({**fac, n: leaf})
                (g,) = torch.autograd.grad(total.sum(), [leaf])
            w = g.sum(dim=tuple(range(g.dim() - extra, g.dim()))) if extra else g
            k = w.shape[-1]
            flat = w.reshape(-1, k).clamp_min(0)
            rng = self._rng
            with rng(n) if rng is not None else contextlib.nullcontext():  # sharded: globals on the shared stream
                pick = torch.multinomial(flat, 1).reshape(w.shape[:-1])
            out["@index:" + n] = pick
            mask = torch.full(w.shape, -math.inf, dtype=fac[n].dtype, device=w.device)
            mask.scatter_(-1, pick.unsqueeze(-1), 0.0)
            fac[n] = fac[n] + mask.reshape(tuple(mask.shape) + (1,) * extra)
            v = self.samples[n]
            ev = self._event[n]
            idx = pick.reshape(tuple(pick.shape) + (1,) + (1,) * ev)
            src = v.unsqueeze(0).expand((num_samples,) + tuple(v.shape))
            idx = idx.expand(tuple(pick.shape) + (1,) + tuple(v.shape[v.dim() - ev:]))
            out[n] = torch.gather(src, pick.dim(), idx).squeeze(pick.dim())
        return out
