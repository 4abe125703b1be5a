"""Posterior summaries of one TMC draw: marginal weights over samples, means, backward sampling."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Dict, Mapping, Optional, Sequence

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
                 rng: Optional[Callable[[str], ContextManager[object]]] = None, *,
                 differentiable: bool = False) -> None:
        """One draw ``tr`` of ``model`` contracted by ``plan``.

        ``log_sum(factors)`` is the estimator's contraction of factors laid out as ``tr``'s (all-reduced when sharded),
        ``rng(latent)`` its random stream for a latent (sharded TMC), ``norm`` its log-normaliser;
        ``differentiable``: keep what `differentiable_log_marginal` needs.
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
            names = list(leaves) if differentiable else list(model.latents())
            grads = dict(zip(names, torch.autograd.grad(total.sum(), [leaves[n] for n in names])))
        self.log_marginal = total.detach() - norm
        self._surrogate: Optional[torch.Tensor] = None
        if differentiable:
            # d log P / d theta = sum over factors and entries of (d log P / d f) (d f / d theta): the contraction's
            # gradient, already computed, against the factors' own graph; entries of zero weight (f = -inf, gradient
            # 0) are masked so they give 0, not 0 * inf
            terms = []
            for n, g in grads.items():
                f = tr.factors[n]
                if f.requires_grad:
                    f = f.expand(batch + tuple(f.shape[f.dim() - core[n]:]))
                    terms.append((g * f.masked_fill(g == 0, 0.0)).sum())
            self._surrogate = torch.stack(terms).sum() if terms else total.new_zeros(())
        self.samples: Dict[str, torch.Tensor] = {}
        self.marginals: Dict[str, torch.Tensor] = {}
        self._event: Dict[str, int] = {}
        for n in model.latents():
            g = grads[n]
            extra = len(factor_indices(model, layout.index_of, n)) - 1
            w = g.sum(dim=tuple(range(g.dim() - extra, g.dim()))) if extra else g
            self.marginals[n] = w
            self._event[n] = tr.event_dims[n]
            self.samples[n] = layout.site_view(tr.values[n].detach(), n, tr.event_dims[n])

    def differentiable_log_marginal(self) -> torch.Tensor:
        """This draw's ``log P_TMC``, summed over the data batch, with its gradient: a 0-dim tensor.

        Its gradient with respect to anything the draw's log-factors depend on (the model's parameters; the
        proposals' parameters, through their log-densities and reparameterised samples) is that of ``log P_TMC``
        of this very draw, at no second contraction: the contraction's gradient with respect to each factor,
        computed for the marginals, is paired with the factors' own graph.  Wake-theta of reweighted wake-sleep
        uses it (`tmcgraph.learn.fit`).

        Raises:
            TMCError: the posterior was built without ``differentiable=True`` (`TMC.posterior`).
        """
        if self._surrogate is None:
            raise TMCError("differentiable_log_marginal needs the posterior built by TMC.posterior(data, "
                           "differentiable=True)")
        value = self.log_marginal.sum()
        return value + (self._surrogate - self._surrogate.detach())

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

    def sample(self, num_samples: int, *, latents: Optional[Sequence[str]] = None,
               chunk_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Importance samples drawn through the contraction (backward sampling).

        Draws ``num_samples`` joint index assignments from the TMC posterior over
        sample indices (probability proportional to the product of factors),
        latent by latent: each latent's copies are drawn from their marginals
        conditioned on the latents drawn before (fewer plates first), by one
        contraction with the earlier choices clamped.

        Args:
            num_samples: the number of joint samples.
            latents: draw only these latents, from their joint posterior (the others summed out, as the
                contraction does): cheaper when the rest are many (local latents) and not needed.
            chunk_size: draw at most this many samples per pass (memory: a pass holds the clamped factors
                with a batch of ``chunk_size``); the chunks are independent draws, concatenated.

        Returns:
            latent -> ``(num_samples, *batch, *plates, *event)`` values, and
            ``"@index:<latent>"`` -> ``(num_samples, *batch, *plates)`` indices.
        """
        for what, n in (("num_samples", num_samples), ("chunk_size", 1 if chunk_size is None else chunk_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise TMCError(f"{what} must be a positive int, got {n!r}")
        model = self._model
        topo = {n: k for k, n in enumerate(model.latents())}
        if latents is not None:
            unknown = [n for n in latents if n not in topo]
            if isinstance(latents, str) or unknown:
                raise TMCError(f"sample: latents must be a list of latents of the model; unknown {unknown or latents!r}"
                               f", latents: {list(topo)}")
        wanted = set(topo if latents is None else latents)
        order = sorted(wanted, key=lambda n: (len(model.sites[n].plates), topo[n]))
        if chunk_size is not None and chunk_size < num_samples:
            parts = [self._sample(min(chunk_size, num_samples - start), order)
                     for start in range(0, num_samples, chunk_size)]
            return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        return self._sample(num_samples, order)

    def _sample(self, num_samples: int, order: Sequence[str]) -> Dict[str, torch.Tensor]:
        """`sample` of the latents in ``order`` (the order they are drawn in), in one pass."""
        model = self._model
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
