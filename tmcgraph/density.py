"""The joint density of a declared model at given particle values, factor by factor.

TMC, IWAE and SMC draw their own samples.  Samplers that move particles
themselves (MCMC, the APG samplers of `apg`) need the other half: the log
joint ``log p(x, z)`` of given values, and, for a block update, only the factors
of the compiled factor graph that touch the block (its Markov blanket).

Particle layout: every latent's value is ``(*batch, L, *its plates, *event)``
(``L`` particles per data batch element, plates in the latent's declared
order); observed values are ``(*batch, *plates, *event)`` as everywhere in
tmcgraph.  Internally the particles are one shared sample index (the IWAE
layout), so the user's functions see the usual positional layout of
`tmcgraph.model`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .declaration import ModelBase as Model
from .errors import TMCError
from .layout import Layout, build_graph, data_batch_shape
from .support import Checks, observed_log_prob
from .trace import site_density

__all__ = ["JointDensity"]

_PARTICLES = "particles"


class JointDensity:
    """``log p(x, z)`` of a `Model` at given particle values.

    Example::

        dens = JointDensity(model)
        dens.blanket(["c"])                       # ('c', 'x'): factors touching c
        lp = dens.log_prob(values, data)          # (*batch, L)
        lp_c = dens.log_prob(values, data, sites=dens.blanket(["c"]), keep_plates=["N"])  # (*batch, L, N)

    Args:
        model: the declared model (its structure is resolved here; editing the
            model afterwards is an error at the next evaluation).
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._version = model.version
        self.latents = model.latents()
        self.observations = model.observations()
        index_of = {name: name for name in self.latents}
        sizes = {name: 1 for name in self.latents}
        plates = {name: model.sites[name].plates for name in self.latents}
        # the factor graph TMC would compile (one index per latent): its factors' index sets
        self.graph = build_graph(model, index_of, sizes, plates)
        self._layouts: Dict[Tuple[Tuple[int, ...], int], Layout] = {}
        self._last_data: Optional[Tuple[list, Tuple[int, ...], list]] = None

    def _check_version(self) -> None:
        if self.model.version != self._version:
            raise TMCError("the model was edited after its JointDensity was built; build a new one")

    def _checked_batch(self, data: Mapping[str, object]) -> Tuple[int, ...]:
        """`data_batch_shape`, skipped when ``data`` holds the very tensors of the previous call.

        (which checks the data, NaN included: a host sync), skipped when ``data`` holds the very tensors of the previous
        call, unmodified (a sampler evaluates blankets dozens of times on one batch).  The cache keeps the tensors
        themselves, so an identity cannot be reused.
        """
        if torch.compiler.is_compiling():  # shapes only: traced code checks no values (see data_batch_shape)
            return data_batch_shape(self.model, data)
        key = [(v, v._version) if isinstance(v, torch.Tensor) else None for v in data.values()]
        last = self._last_data
        if last is not None and len(last[0]) == len(key) and list(data) == last[2] and all(
                k is not None and c is not None and k[0] is c[0] and k[1] == c[1] for k, c in zip(key, last[0])):
            return last[1]
        batch = data_batch_shape(self.model, data)
        self._last_data = (key, batch, list(data))
        return batch

    def blanket(self, variables: Sequence[str]) -> Tuple[str, ...]:
        """The factors (site names) of the compiled graph whose indices include a latent in ``variables``.

        The terms of ``log p(x, z)`` outside the blanket do not change when
        only ``variables`` change, so they cancel in any ratio of joints.
        """
        self._check_version()
        if isinstance(variables, str):
            variables = [variables]
        unknown = [v for v in variables if v not in self.latents]
        if unknown:
            raise TMCError(f"blanket: {unknown} are not latents of the model; latents: {self.latents}")
        wanted = set(variables)
        return tuple(name for name, spec in self.graph.factors.items() if wanted & set(spec.indices))

    def _layout(self, batch: Tuple[int, ...], num_particles: int) -> Layout:
        key = (batch, num_particles)
        layout = self._layouts.get(key)
        if layout is None:
            layout = Layout(self.model, {n: _PARTICLES for n in self.latents}, {_PARTICLES: num_particles}, batch)
            self._layouts[key] = layout
        return layout

    def _latent_value(self, layout: Layout, name: str, value: torch.Tensor, num_particles: int) -> torch.Tensor:
        """``(*batch, L, *plates, *event)`` -> layout ``(*batch, L, *all plates (1 where absent), *event)``."""
        site = self.model.sites[name]
        nb = len(layout.batch)
        lead = nb + 1 + len(site.plates)

        def expected() -> str:  # built only for an error (keeps the hot path free of string work)
            return ", ".join([*(str(b) for b in layout.batch), f"L={num_particles}",
                              *(f"{p}={self.model.plates[p]}" for p in site.plates)])

        if not isinstance(value, torch.Tensor) or value.dim() < lead:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TMCError(f"latent {name!r}: value has shape {shape}, expected ({expected()}, *event)")
        got = tuple(value.shape[:lead])
        want = layout.batch + (num_particles,) + tuple(self.model.plates[p] for p in site.plates)
        if any(g != w and not (g == 1 and k < nb) for k, (g, w) in enumerate(zip(got, want))):
            raise TMCError(f"latent {name!r}: value has shape {tuple(value.shape)}, expected ({expected()}, *event)")
        event = tuple(value.shape[lead:])
        order = sorted(range(len(site.plates)), key=lambda k: layout.plate_names.index(site.plates[k]))
        value = value.permute(list(range(nb + 1)) + [nb + 1 + k for k in order] + list(range(lead, value.dim())))
        dims = list(value.shape[: nb + 1])
        for p in layout.plate_names:
            dims.append(self.model.plates[p] if p in site.plates else 1)
        return value.reshape(dims + list(event))

    def log_prob(self, values: Mapping[str, torch.Tensor], data: Mapping[str, object],
                 sites: Optional[Sequence[str]] = None, keep_plates: Sequence[str] = ()) -> torch.Tensor:
        """Sum of the log-factors of ``sites`` (default: all) at the given values.

        Args:
            values: every latent -> ``(*batch, L, *its plates, *event)``.
            data: every observation -> ``(*batch, *its plates, *event)``.
            sites: the factors to sum (site names, e.g. from `blanket`).
            keep_plates: plates not summed over; every site summed must be in
                them (the per-element terms of a block local to a plate).

        Returns:
            ``(*batch, L, *sizes of keep_plates)``.
        """
        self._check_version()
        sites = tuple(self.model.order() if sites is None else sites)
        unknown = [s for s in sites if s not in self.model.sites]
        if unknown:
            raise TMCError(f"log_prob: unknown sites {unknown}; sites: {list(self.model.sites)}")
        keep = tuple(keep_plates)
        for p in keep:
            if p not in self.model.plates:
                raise TMCError(f"log_prob: keep_plates names {p!r}, which is not a plate; plates: "
                               f"{list(self.model.plates)}")
        missing = [n for n in self.latents if n not in values]
        if missing:
            raise TMCError(f"log_prob: no value given for latent(s) {missing}")
        batch = self._checked_batch(data)
        first = values[self.latents[0]]
        nb = len(batch)
        if first.dim() <= nb:
            raise TMCError(f"latent {self.latents[0]!r}: value has shape {tuple(first.shape)}, expected "
                           f"(*batch={batch}, L, ...)")
        num_particles = first.shape[nb]
        layout = self._layout(batch, num_particles)
        # only the values the summed factors read (their sites and parents) are laid out and checked
        needed = set(sites).union(*(self.model.sites[n].parents for n in sites))
        vals = {n: layout.data_value(n, data[n]) for n in self.observations if n in needed}
        vals.update({n: self._latent_value(layout, n, values[n], num_particles) for n in self.latents if n in needed})
        events = {n: self.model.sites[n].event_dim for n in self.observations if n in needed}
        events.update({n: vals[n].dim() - len(batch) - layout.ndim for n in self.latents if n in needed})
        total = None
        checks = Checks()
        for name in sites:
            site = self.model.sites[name]
            kind = "latent" if site.kind == "latent" else "observation"
            owner = f"{kind} {name!r}"
            not_in = [p for p in keep if p not in site.plates]
            if not_in:
                raise TMCError(f"log_prob: {owner} is not in plate(s) {not_in}, so its term cannot be kept per "
                               "element of them")
            d = site_density(layout, self.model, name, vals, events, sample_index=_PARTICLES)
            value = vals[name]
            if site.kind == "latent":
                lp = d.log_prob(value)
            else:
                lp, _ = observed_log_prob(owner, d, value, layout.index_dims, checks)
            full = layout.template([_PARTICLES], site.plates)
            if lp.dim() != len(full):
                raise TMCError(f"{owner}: its log-density has shape {tuple(lp.shape)}, expected "
                               f"{layout.describe(full)}; check the event dims of its value")
            lp = lp.expand(torch.Size(full))
            summed = [nb + layout.ndim + layout.plate_pos[p] for p in layout.plate_names if p not in keep]
            lp = lp.sum(summed, keepdim=True) if summed else lp
            # (*batch, L, plate dims (kept ones full, others 1)) -> (*batch, L, *keep in the given order)
            kept_pos = [nb + layout.ndim + layout.plate_pos[p] for p in keep]
            lp = lp.permute(list(range(nb + 1)) + kept_pos + [d for d in range(nb + 1, lp.dim()) if d not in kept_pos])
            lp = lp.reshape(lp.shape[: nb + 1 + len(keep)])
            total = lp if total is None else total + lp
        if total is None:
            return torch.zeros(batch + (num_particles,) + tuple(self.model.plates[p] for p in keep))
        return total
