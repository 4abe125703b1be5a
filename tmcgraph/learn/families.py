"""Learnable, factorised exponential-family proposals: one per latent, with parameters per plate element.

Each family is a `torch.nn.Module` that a model calls as a latent's proposal (no parents).  It has two
parameterisations of the same distribution:

* unconstrained ``nn.Parameter`` s (location and log-scale, log-concentrations, logits) that VI, DReGs and
  reweighted wake-sleep train by gradient;
* mean parameters, the expectations of its sufficient statistics ``T(z)``, which QEM (Heap, Bowyer and
  Aitchison, AABI 2025) moves towards the TMC posterior's: ``m <- (1 - lr) m + lr E_post[T(z)]``, then sets the
  distribution by moment matching (`ExpFamily.set_mean_parameters`).

=============  ===========================  ========================================  ====================
family         sufficient statistics        mean parameters from the distribution     moment matching
=============  ===========================  ========================================  ====================
`Normal`       ``z, z^2``                   ``mu, mu^2 + sigma^2``                    closed form
`Gamma`        ``log z, z``                 ``psi(a) - log b, a / b``                 Newton on ``a``
`Beta`         ``log z, log(1 - z)``        ``psi(a) - psi(a + b), psi(b) - psi(a+b)`` Dirichlet's, 2 parts
`Dirichlet`    ``log z_j``                  ``psi(a_j) - psi(sum a)``                 Minka's fixed point
`Categorical`  ``one_hot(z)``               ``probs``                                 closed form
=============  ===========================  ========================================  ====================

Shapes: a family's parameters are laid out ``(*plate sizes of its latent, *event)`` in the latent's plate
order, the layout of `tmcgraph.Posterior.samples` without the sample dim; called as a proposal it views them
in the model's tensor layout (`tmcgraph.model`).  `mean_field` builds one per latent of a model.
"""

from __future__ import annotations

import inspect
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.distributions import Distribution, Independent
from typing_extensions import override

from ..declaration import ModelBase
from ..errors import TMCError

__all__ = ["Beta", "Categorical", "Dirichlet", "ExpFamily", "FAMILIES", "Gamma", "Normal", "inverse_digamma",
           "mean_field"]


def inverse_digamma(y: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """``x`` with ``digamma(x) = y``, elementwise.

    Newton's method from Minka's initialisation (appendix C of "Estimating a Dirichlet distribution", 2000).
    """
    x = torch.where(y >= -2.22, y.exp() + 0.5, -1.0 / (y - torch.digamma(torch.ones((), dtype=y.dtype))))
    for _ in range(iterations):
        x = x - (torch.digamma(x) - y) / torch.polygamma(1, x)
    return x


def dirichlet_from_mean_log(mean_log: torch.Tensor) -> torch.Tensor:
    """The Dirichlet concentrations ``a`` with ``psi(a_j) - psi(sum a) = mean_log_j`` (last dim the parts).

    Minka's fixed point ``a_j <- psi^{-1}(psi(sum a) + mean_log_j)`` (guaranteed to converge), then Newton steps
    with the Hessian's diagonal-plus-rank-one structure.
    """
    a = torch.ones_like(mean_log)
    for _ in range(8):
        a = inverse_digamma(torch.digamma(a.sum(-1, keepdim=True)) + mean_log)
    for _ in range(6):
        total = a.sum(-1, keepdim=True)
        g = torch.digamma(total) - torch.digamma(a) + mean_log
        q = -torch.polygamma(1, a)
        z = torch.polygamma(1, total)
        b = (g / q).sum(-1, keepdim=True) / (1.0 / z + (1.0 / q).sum(-1, keepdim=True))
        a = (a - (g - b) / q).clamp_min(torch.finfo(a.dtype).tiny)
    return a


def gamma_from_mean_log_and_mean(mean_log: torch.Tensor, mean: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gamma ``(concentration, rate)`` with ``E[log z] = mean_log`` and ``E[z] = mean``.

    ``s = log E[z] - E[log z] > 0`` (Jensen) fixes the concentration: ``log a - psi(a) = s``, solved by Newton from
    the approximation ``a = (3 - s + sqrt((s - 3)^2 + 24 s)) / (12 s)`` (Minka, "Estimating a Gamma
    distribution", 2002); the rate is ``a / E[z]``.
    """
    tiny = torch.finfo(mean.dtype).tiny
    s = (mean.clamp_min(tiny).log() - mean_log).clamp_min(1e-6)
    a = (3 - s + ((s - 3) ** 2 + 24 * s).sqrt()) / (12 * s)
    for _ in range(6):
        a = (a - (a.log() - torch.digamma(a) - s) / (1.0 / a - torch.polygamma(1, a))).clamp_min(tiny)
    return a, a / mean.clamp_min(tiny)


class ExpFamily(nn.Module):
    """A factorised exponential-family proposal with one set of parameters per plate element.

    Args:
        plates: the latent's plates, in its declared order (`Site.plates`).
        plate_sizes: their sizes.
        layout_plates: every plate of the model, in declaration order (the tensor layout's plate dims).
        event_shape: the latent's event shape.

    Subclasses set ``family`` (the torch distribution, whose arguments are the keys of ``params``) and define
    ``params``, ``statistics``, ``mean_parameters`` and ``set_mean_parameters``.
    """

    #: the family's name in `FAMILIES`
    name = "expfamily"
    #: the torch distribution class, called with ``params()``
    family: type = Distribution
    #: a proposal without parents, for `tmcgraph.Model`'s inspection of a site function's arguments
    __signature__ = inspect.Signature()

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = ()) -> None:
        super().__init__()
        if len(plates) != len(plate_sizes):
            raise TMCError(f"{type(self).__name__}: {len(plates)} plates but {len(plate_sizes)} plate sizes")
        self.plates = tuple(plates)
        self.plate_shape = tuple(int(s) for s in plate_sizes)
        self.layout_plates = tuple(layout_plates) if layout_plates is not None else self.plates
        missing = [p for p in self.plates if p not in self.layout_plates]
        if missing:
            raise TMCError(f"{type(self).__name__}: plates {missing} are not among the layout's {self.layout_plates}")
        self.event_shape = tuple(int(s) for s in event_shape)

    # -- the distribution ---------------------------------------------------------------------------------
    def forward(self) -> Distribution:
        """The proposal, its parameters in the model's tensor layout ``(*plate dims, *event)``."""
        return self._distribution({k: self._to_layout(v) for k, v in self.params().items()})

    def site_distribution(self) -> Distribution:
        """The proposal laid out as posterior samples are: batch ``(*plates of the latent, 1)``, for the K dim."""
        return self._distribution({k: v.unsqueeze(len(self.plate_shape)) for k, v in self.params().items()})

    def _distribution(self, params: Dict[str, torch.Tensor]) -> Distribution:
        """``family(**params)``, independent over the event dims the family does not make its own."""
        d = self.family(**params)
        extra = len(self.event_shape) - len(d.event_shape)
        return Independent(d, extra) if extra else d

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z)`` of samples laid out ``(*plates of the latent, K, *event)``: ``(*plates, K)``."""
        return self.site_distribution().log_prob(z)

    def params(self) -> Dict[str, torch.Tensor]:
        """The constrained parameters, each ``(*plate sizes, *parameter event)``."""
        raise NotImplementedError

    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        """Sufficient statistics ``T(z)`` of samples ``(..., *event)``: ``(..., *mean parameter shape)``."""
        raise NotImplementedError

    def mean_parameters(self) -> torch.Tensor:
        """``E_q[T(z)]`` under the current parameters: ``(*plate sizes, *mean parameter shape)``."""
        raise NotImplementedError

    def set_mean_parameters(self, m: torch.Tensor) -> None:
        """Set the parameters to the member of the family whose ``E[T(z)]`` is ``m`` (moment matching)."""
        raise NotImplementedError

    def qem_step(self, posterior_statistics: torch.Tensor, lr: float) -> None:
        """QEM's update: ``m <- (1 - lr) E_q[T] + lr * posterior_statistics``, then moment matching.

        Args:
            posterior_statistics: ``E_post[T(z)]``, ``(*plate sizes, *mean parameter shape)`` (e.g.
                `tmcgraph.Posterior.mean` with ``fn=self.statistics``).
            lr: the moving average's step, in ``(0, 1]``.
        """
        if not 0 < lr <= 1:
            raise TMCError(f"{type(self).__name__}: the QEM step lr must be in (0, 1], got {lr!r}")
        with torch.no_grad():
            current = self.mean_parameters()
            if tuple(posterior_statistics.shape) != tuple(current.shape):
                raise TMCError(f"{type(self).__name__} over plates {list(self.plates)}: posterior statistics of shape "
                               f"{tuple(posterior_statistics.shape)}, expected {tuple(current.shape)}")
            self.set_mean_parameters((1 - lr) * current + lr * posterior_statistics.to(current.dtype))

    # -- layout -------------------------------------------------------------------------------------------
    def _to_layout(self, t: torch.Tensor) -> torch.Tensor:
        """``(*plates in the latent's order, *rest)`` -> ``(*every layout plate, 1 where not the latent's, *rest)``."""
        n = len(self.plates)
        order = [self.plates.index(p) for p in self.layout_plates if p in self.plates]
        t = t.permute(order + list(range(n, t.dim())))
        shape = [t.shape[order.index(self.plates.index(p))] if p in self.plates else 1 for p in self.layout_plates]
        return t.reshape(shape + list(t.shape[n:]))

    def _param(self, value: Union[float, torch.Tensor], event: Sequence[int] = ()) -> nn.Parameter:
        shape = self.plate_shape + tuple(event)
        return nn.Parameter(torch.as_tensor(value, dtype=torch.get_default_dtype()).expand(shape).clone())

    @override
    def extra_repr(self) -> str:
        return f"plates={list(self.plates)}, plate_shape={self.plate_shape}, event_shape={self.event_shape}"


class Normal(ExpFamily):
    """``Normal(loc, exp(log_scale))``, independent over the event dims; statistics ``(z, z^2)`` (last dim 2)."""

    name = "normal"
    family = torch.distributions.Normal

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = (), *,
                 loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__(plates, plate_sizes, layout_plates, event_shape)
        self.loc = self._param(loc, self.event_shape)
        self.log_scale = self._param(math.log(scale), self.event_shape)

    @override
    def params(self) -> Dict[str, torch.Tensor]:
        return {"loc": self.loc, "scale": self.log_scale.exp()}

    @override
    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z, z * z], -1)

    @override
    def mean_parameters(self) -> torch.Tensor:
        loc, scale = self.loc, self.log_scale.exp()
        return torch.stack([loc, loc * loc + scale * scale], -1)

    @override
    def set_mean_parameters(self, m: torch.Tensor) -> None:
        var = (m[..., 1] - m[..., 0] ** 2).clamp_min(torch.finfo(m.dtype).tiny)
        self.loc.data.copy_(m[..., 0])
        self.log_scale.data.copy_(0.5 * var.log())


class Gamma(ExpFamily):
    """``Gamma(exp(log_concentration), exp(log_rate))``; statistics ``(log z, z)`` (last dim 2)."""

    name = "gamma"
    family = torch.distributions.Gamma

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = (), *,
                 concentration: float = 1.0, rate: float = 1.0) -> None:
        super().__init__(plates, plate_sizes, layout_plates, event_shape)
        self.log_concentration = self._param(math.log(concentration), self.event_shape)
        self.log_rate = self._param(math.log(rate), self.event_shape)

    @override
    def params(self) -> Dict[str, torch.Tensor]:
        return {"concentration": self.log_concentration.exp(), "rate": self.log_rate.exp()}

    @override
    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z.log(), z], -1)

    @override
    def mean_parameters(self) -> torch.Tensor:
        a, b = self.log_concentration.exp(), self.log_rate.exp()
        return torch.stack([torch.digamma(a) - b.log(), a / b], -1)

    @override
    def set_mean_parameters(self, m: torch.Tensor) -> None:
        a, b = gamma_from_mean_log_and_mean(m[..., 0], m[..., 1])
        self.log_concentration.data.copy_(a.log())
        self.log_rate.data.copy_(b.log())


class Beta(ExpFamily):
    """``Beta(exp(log_concentration1), exp(log_concentration0))``; statistics ``(log z, log(1 - z))``."""

    name = "beta"
    family = torch.distributions.Beta

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = (), *,
                 concentration1: float = 1.0, concentration0: float = 1.0) -> None:
        super().__init__(plates, plate_sizes, layout_plates, event_shape)
        self.log_concentration1 = self._param(math.log(concentration1), self.event_shape)
        self.log_concentration0 = self._param(math.log(concentration0), self.event_shape)

    @override
    def params(self) -> Dict[str, torch.Tensor]:
        return {"concentration1": self.log_concentration1.exp(), "concentration0": self.log_concentration0.exp()}

    @override
    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z.log(), torch.log1p(-z)], -1)

    @override
    def mean_parameters(self) -> torch.Tensor:
        a, b = self.log_concentration1.exp(), self.log_concentration0.exp()
        total = torch.digamma(a + b)
        return torch.stack([torch.digamma(a) - total, torch.digamma(b) - total], -1)

    @override
    def set_mean_parameters(self, m: torch.Tensor) -> None:
        ab = dirichlet_from_mean_log(m)
        self.log_concentration1.data.copy_(ab[..., 0].log())
        self.log_concentration0.data.copy_(ab[..., 1].log())


class Dirichlet(ExpFamily):
    """``Dirichlet(exp(log_concentration))`` over the last event dim; statistics ``log z``.

    ``event_shape`` is the latent's, its last dim the simplex's parts.
    """

    name = "dirichlet"
    family = torch.distributions.Dirichlet

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = (2,), *,
                 concentration: float = 1.0) -> None:
        super().__init__(plates, plate_sizes, layout_plates, event_shape)
        if len(self.event_shape) != 1:
            raise TMCError(f"Dirichlet proposal: event_shape must be (parts,), got {self.event_shape}")
        self.log_concentration = self._param(math.log(concentration), self.event_shape)

    @override
    def params(self) -> Dict[str, torch.Tensor]:
        return {"concentration": self.log_concentration.exp()}

    @override
    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        return z.log()

    @override
    def mean_parameters(self) -> torch.Tensor:
        a = self.log_concentration.exp()
        return torch.digamma(a) - torch.digamma(a.sum(-1, keepdim=True))

    @override
    def set_mean_parameters(self, m: torch.Tensor) -> None:
        self.log_concentration.data.copy_(dirichlet_from_mean_log(m).log())


class Categorical(ExpFamily):
    """``Categorical(logits=logits)`` over ``num_categories``; statistics ``one_hot(z)`` (last dim the categories)."""

    name = "categorical"
    family = torch.distributions.Categorical

    def __init__(self, plates: Sequence[str] = (), plate_sizes: Sequence[int] = (),
                 layout_plates: Optional[Sequence[str]] = None, event_shape: Sequence[int] = (), *,
                 num_categories: int = 2) -> None:
        super().__init__(plates, plate_sizes, layout_plates, event_shape)
        if self.event_shape:
            raise TMCError(f"Categorical proposal: a categorical latent has no event dims, got {self.event_shape}")
        if isinstance(num_categories, bool) or not isinstance(num_categories, int) or num_categories < 1:
            raise TMCError(f"Categorical proposal: num_categories must be a positive int, got {num_categories!r}")
        self.logits = self._param(0.0, (num_categories,))

    @override
    def params(self) -> Dict[str, torch.Tensor]:
        return {"logits": self.logits}

    @override
    def statistics(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(z.long(), self.logits.shape[-1]).to(self.logits.dtype)

    @override
    def mean_parameters(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    @override
    def set_mean_parameters(self, m: torch.Tensor) -> None:
        self.logits.data.copy_(m.clamp_min(torch.finfo(m.dtype).tiny).log())


#: family name -> class, for `mean_field`'s ``families``
FAMILIES: Dict[str, Type[ExpFamily]] = {c.name: c for c in (Normal, Gamma, Beta, Dirichlet, Categorical)}


def mean_field(model: ModelBase, families: Optional[Mapping[str, str]] = None, *, default: str = "normal",
               data: Optional[Mapping[str, object]] = None,
               event_shapes: Optional[Mapping[str, Sequence[int]]] = None,
               init: Optional[Mapping[str, Mapping[str, float]]] = None) -> Dict[str, ExpFamily]:
    """One learnable proposal per sampled latent of ``model``, with parameters per element of its plates.

    Args:
        model: the model (its plates and latents are read, not changed; pass the result to
            `tmcgraph.declaration.ModelBase.with_proposals` or `tmcgraph.learn.fit`).
        families: latent -> a name in `FAMILIES` (``"normal"``, ``"gamma"``, ``"beta"``, ``"dirichlet"``,
            ``"categorical"``); latents not listed get ``default``.  Choose by the prior's support: real,
            positive, unit interval, simplex, finite.
        default: the family of unlisted latents.
        data: observations; if given, one draw of the model (its current proposals, K=1) reads every latent's
            event shape, so ``event_shapes`` is not needed.
        event_shapes: latent -> its event shape (default: read from ``data``, else ``()``).
        init: latent -> keyword arguments of its family (``loc``/``scale``, ``concentration``/``rate``, ...,
            ``num_categories``).

    Returns:
        latent -> its proposal (a `torch.nn.Module`), in the model's latent order.
    """
    families, event_shapes, init = dict(families or {}), dict(event_shapes or {}), dict(init or {})
    sampled = [n for n in model.latents() if not model.sites[n].enumerate]
    for what, given in (("families", families), ("event_shapes", event_shapes), ("init", init)):
        unknown = [n for n in given if n not in sampled]
        if unknown:
            raise TMCError(f"mean_field: {what} names {unknown}, which are not sampled latents; sampled latents: "
                           f"{sampled}")
    if data is not None:
        from ..estimators import TMC

        tr, _, _ = TMC(model, 1)._trace(data)
        for name in sampled:
            ev = tr.event_dims[name]
            event_shapes.setdefault(name, tuple(tr.values[name].shape[tr.values[name].dim() - ev:]) if ev else ())
    out: Dict[str, ExpFamily] = {}
    for name in sampled:
        family = families.get(name, default)
        if family not in FAMILIES:
            raise TMCError(f"mean_field: latent {name!r}: unknown family {family!r}; expected one of "
                           f"{sorted(FAMILIES)}")
        site = model.sites[name]
        out[name] = FAMILIES[family](site.plates, [model.plates[p] for p in site.plates], list(model.plates),
                                     event_shapes.get(name, (2,) if family == "dirichlet" else ()),
                                     **init.get(name, {}))
    return out
