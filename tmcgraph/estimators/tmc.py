"""The Tensor Monte Carlo estimator (Aitchison, NeurIPS 2019): every latent has its own index of K samples."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.distributions import constraints

from ..declaration import ModelBase as Model
from ..distributed import Shard
from ..errors import TMCError
from ..evaluate import lower
from ..evaluate.compiled import compile_function, distribution_validation
from ..evaluate.kernels import underflow_threshold
from ..layout import Layout, as_data
from ..plan import Plan
from ..trace import Trace, trace
from . import dregs
from .base import GraphEstimator, check_k, enumerated_size
from .posterior import Posterior

__all__ = ["TMC"]


class TMC(GraphEstimator):
    """The Tensor Monte Carlo estimator of a model (built by `Model.compile`).

    ``P_TMC = 1/prod(K) * sum over all combinations of sample indices of
    p(x, z^k) / prod_i Q(z_i^{k_i})``, an unbiased estimate of ``p(x)``, computed
    as one contraction whose cost follows the model's tree-width.

    Attributes:
        K: samples per sampled latent.
        plan: the compiled `Plan` (``plan.treewidth``, ``plan.describe()``).
        graph: the `FactorGraph` of sample indices.
        backend: ``"eager"`` or ``"compiled"``: how the plan runs (`Plan.log_sum`).
        scan: whether chains of factors are contracted by a parallel scan (``"auto"``,
            ``"always"``, ``"never"``; `tmcgraph.FactorGraph.compile`).
        groups: tuples of latents that share one sample index (`tmcgraph.Model.compile`'s ``groups``).
    """

    def __init__(self, model: Model, K: Union[int, Mapping[str, int]], *, optimize: str = "auto",
                 memory_limit: Optional[int] = None, backend: str = "eager", shard: Optional[Shard] = None,
                 scan: str = "auto", groups: Sequence[Sequence[str]] = ()) -> None:
        latents = model.latents()
        self.shard = _check_shard(model, shard, backend)
        if shard is not None:
            plate = shard.plate
            self._rng = lambda name: shard.stream(shared=plate not in model.sites[name].plates)
        self._shard_norms: Dict[tuple, float] = {}
        self._objectives: Dict[tuple, tuple] = {}  # data layout -> compiled objective (backend="compiled")
        self._supports: Dict[tuple, Dict[str, constraints.Constraint]] = {}  # data layout -> observed supports
        self._shapes: Dict[tuple, List[Tuple[int, ...]]] = {}  # data layout -> the plan's input shapes
        sampled = [n for n in latents if not model.sites[n].enumerate]
        if isinstance(K, Mapping):
            unknown = [n for n in K if n not in latents]
            if unknown:
                raise TMCError(f"K given for {unknown}, which are not latents; latents: {latents}")
            enumerated = [n for n in K if model.sites[n].enumerate]
            if enumerated:
                raise TMCError(f"K given for enumerated latent(s) {enumerated}: their K is their support size")
            missing = [n for n in sampled if n not in K]
            if missing:
                raise TMCError(f"K has no entry for sampled latent(s) {missing}")
            self.K = {n: check_k(n, K[n]) for n in sampled}
        else:
            self.K = {n: check_k(n, K) for n in sampled}
        index_of = {n: n for n in latents}
        self.groups = _check_groups(model, groups, self.K)
        for members in self.groups:
            for n in members:
                index_of[n] = "+".join(members)  # one index: the members' k-th samples are drawn together
        sizes = {index_of[n]: self.K[n] if n in self.K else enumerated_size(model, n) for n in latents}
        plates = {index_of[n]: model.sites[n].plates for n in latents}
        super().__init__(model, index_of, sizes, plates, optimize=optimize, memory_limit=memory_limit,
                         backend=backend, scan=scan)

    def log_marginal(self, data: Mapping[str, object]) -> torch.Tensor:
        """Log of the TMC estimate of ``p(x)``; differentiable (reparameterised samples).

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``; each
                batch element gets independent samples.

        Returns:
            tensor ``(*batch,)``.  Its exp is unbiased for ``p(x)``.
        """
        if self.backend == "compiled" and self.shard is None and all(s is not None for s in self._sizes.values()):
            return self._compiled_log_marginal(data)
        tr, plan, norm = self._trace(data)
        return self._log_sum(plan, tr.factors, share=True) - norm

    # -- the compiled objective ------------------------------------------------------------
    def _compiled_log_marginal(self, data: Mapping[str, object]) -> torch.Tensor:
        """`log_marginal` with sampling, factors and contraction as one ``torch.compile``'d program.

        The first evaluation per data layout runs eagerly (every check, the layout probes and the
        verification of batched site groups); later ones run the program, compiled on first use.  Every
        call checks the data before the program runs, eagerly and with one host sync: names, NaN and
        infinite values (`data_batch_shape`), and each observed value against the
        support its likelihood had at the first evaluation.  The program returns three flags, checked
        together after it: the underflow flag of the contraction (where a shifted sum lost precision, or a
        NaN or ``+inf`` appeared, the same draw's factors are contracted again by the exact eager
        evaluator) and the value checks made inside it (a proposal's support against its prior's, when
        their bounds are tensors).  When a check failed or a function raised inside the program, the
        evaluation runs again eagerly, which raises the eager error, naming the site.
        """
        layout = self._layout(data)
        key = (layout.batch, tuple(sorted((n, tuple(v.shape), v.dtype, v.device)
                                          for n, v in ((n, as_data(n, v)) for n, v in data.items()))))
        entry = self._objectives.get(key)
        if entry is None:  # first evaluation of this layout: eager, with every check
            self._objectives[key] = ()
            return self._eager_log_marginal(data, key)
        if not entry:
            entry = self._objectives[key] = self._build_objective(layout, key)
        fn, plan, norm, names = entry
        if not _in_support(layout, data, self._supports[key]):
            return self._eager_log_marginal(data, key)  # raises the eager error, naming the observation
        try:
            with distribution_validation(False):  # traced code must not sync on argument checks
                result, ok, checked, factors = fn(dict(data))
        except Exception as err:  # a user function raised: the eager evaluation names the site
            self._eager_log_marginal(data, key)
            raise err  # the eager evaluation succeeded: the compiled program failed in its own right
        if not bool(torch.stack([ok, checked]).all()):  # the one host sync after the program
            if not bool(checked):
                return self._eager_log_marginal(data, key)  # raises, naming the site
            # this draw's factors, contracted exactly
            result = self.evaluator.log_sum(plan, dict(zip(names, factors)), backend="eager") - norm
        return result

    def _eager_log_marginal(self, data: Mapping[str, object], key: tuple) -> torch.Tensor:
        """The eager evaluation behind the compiled objective.

        Records the supports the data are checked against on later calls.
        """
        tr, plan, norm = self._trace(data)
        self._supports[key] = dict(tr.supports)
        self._shapes[key] = [tuple(tr.factors[spec.name].shape) for spec in plan.inputs]
        return self.evaluator.log_sum(plan, tr.factors, backend="eager") - norm

    def _build_objective(self, layout: Layout, key: tuple) -> tuple:
        plan, norm = self._plan_for(tuple(layout.index_sizes.items()))
        names = [spec.name for spec in plan.inputs]
        program = lower(plan, self._shapes[key])  # the same lowered program the eager backend runs
        constant = plan.constant
        model, groups = self.model, self._groups

        def objective(data: Dict[str, object]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
            tr = trace(model, layout, data, groups=groups)
            factors = [tr.factors[name] for name in names]
            result, flag = program.fast(factors)
            result = result + constant if constant else result
            bad = torch.isnan(result).any() | (result == math.inf).any()
            passed = tr.checks.passed()
            checked = passed if passed is not None else torch.ones((), dtype=torch.bool, device=result.device)
            ok = (flag >= underflow_threshold(result.dtype)) & ~bad
            return result - norm, ok, checked, factors

        return compile_function(objective, "objective"), plan, norm, names

    # -- sharding (tmcgraph.distributed) -------------------------------------------------
    def _trace(self, data: Mapping[str, object], **kw) -> Tuple[Trace, Plan, float]:
        tr, plan, norm = super()._trace(data, **kw)
        if self.shard is None:
            return tr, plan, norm
        key = (tuple(tr.layout.index_sizes.items()), tuple(tr.layout.batch))
        if key not in self._shard_norms:
            # log K of the sampled index copies in the sharded plate, summed over the shards (once per shapes);
            # the same collective checks that every process evaluates the same batch shape
            plate = self.shard.plate
            local = sum(math.log(tr.layout.index_sizes[i]) * math.prod(self.model.plates[p]
                                                                          for p in self._index_plates[i])
                        for i in self._sampled_indices() if plate in self._index_plates[i])
            gathered = self.shard.gather_objects((tuple(tr.layout.batch), local))
            batches = [b for b, _ in gathered]
            if any(b != batches[0] for b in batches):
                raise TMCError(f"sharded evaluation: the processes' data batch shapes differ ({batches} by rank); "
                               "every process must evaluate the same batch of datasets (its shard of each)")
            self._shard_norms[key] = norm - local + sum(v for _, v in gathered)
        return tr, plan, self._shard_norms[key]

    def _log_sum(self, plan: Plan, factors: Mapping[str, torch.Tensor], *, share: bool) -> torch.Tensor:
        """``plan.log_sum``.

        Sharded: all-reduced over the plate, replicated factors' gradients shared (``share=True``: divided by the world
        size, see `tmcgraph.distributed`).
        """
        shard = self.shard
        if shard is None:
            return self.evaluator.log_sum(plan, factors)
        if share:
            factors = {n: f if shard.plate in self.model.sites[n].plates else shard.replicated_share(f)
                       for n, f in factors.items()}
        return self.evaluator.log_sum(plan, factors, plate_reduce=(shard.plate, shard.all_reduce))

    def dregs_surrogate(self, data: Mapping[str, object], *, form: str = "tmc") -> torch.Tensor:
        """A surrogate whose gradient w.r.t. the proposal parameters is the DReGs estimator.

        ``form="tmc"`` (default): the doubly-reparameterised gradient of
        ``E[log P_TMC]``, unbiased for any number of latents.  Applying the
        score identity ``E_q[f(z) d log q(z)/dphi] = E_eps[df/dz dz/dphi]`` to
        every sample ``z_i^k`` with ``f = m_i(k)``, the posterior marginal weight
        of sample k of latent i (the share of ``sum_c w_c`` from combinations
        with ``c_i = k``), cancels the score terms against part of the
        reparameterised path and leaves::

            grad = sum_i sum_k m_i(k) * d log P_TMC / d z_i^k * d z_i^k / d phi

        with ``m`` held fixed.  The surrogate's value is ``log P_TMC`` (the same
        number `log_marginal` gives for this draw); its gradient is the
        sum above.  The weights ``m_i(k)`` and the derivatives ``d log P / dz``
        come from one backward pass through the plan.  Plates: one weight per
        plate element.  For one latent it is IWAE's DReGs (Tucker et al. 2019).
        Proposals must be reparameterised and *factorised*: a proposal with
        latent parents is a mixture over their samples, whose samples are not
        independent, and is refused with a `TMCError` naming the latent.

        ``form="paper"``: appendix F's eq. 60,
        ``1/2 * (sum w_bar^2 / (sum w_bar)^2) * log sum w_hat^2`` over all index
        combinations (eq. 54's weights ``w_c^2 / (sum w)^2``).  It is *biased*
        for more than one latent (each sample of a latent appears in
        ``K^(n-1)`` combinations, so the per-combination weights are not the
        per-sample ones the identity needs); kept to compare with the paper.

        Use the gradient w.r.t. proposal parameters only; for model parameters
        use `log_marginal`.

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``.
            form: ``"tmc"`` or ``"paper"``.

        Returns:
            tensor ``(*batch,)``.
        """
        if form == "paper":
            if self.shard is not None:
                raise TMCError("form='paper' is not available sharded; use form='tmc'")
            tr, plan, _ = self._trace(data, dregs=True)
            return dregs.paper_surrogate(tr, plan, self.evaluator)
        if form != "tmc":
            raise TMCError(f"form must be 'tmc' or 'paper', got {form!r}")
        dregs.check_factorised(self.model, self._sampled)
        tr, plan, norm = self._trace(data, detach_samples=True)
        shard = self.shard
        if shard is None:
            return dregs.surrogate(self.model, tr, plan, norm, self._sampled,
                                   log_sum=lambda fs: self._log_sum(plan, fs, share=True))
        model = self.model
        return dregs.surrogate(model, tr, plan, norm, self._sampled,
                               log_sum=lambda fs: self._log_sum(plan, fs, share=True),
                               marginal_scale=lambda name: 1.0 if shard.plate in model.sites[name].plates
                               else float(shard.world))

    # kept for the tests that check each form against its formula
    def _paper_dregs_from_trace(self, tr: Trace, plan: Plan) -> torch.Tensor:
        return dregs.paper_surrogate(tr, plan, self.evaluator)

    def posterior(self, data: Mapping[str, object], *, differentiable: bool = False) -> "Posterior":
        """Draw samples, contract, and return posterior summaries over them.

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``.
            differentiable: also keep the draw's ``log P_TMC`` with its gradient
                (`Posterior.differentiable_log_marginal`); not for a sharded estimator.

        Returns:
            a `Posterior` with the per-latent marginal weights over
            samples (autodiff of ``log P_TMC``), posterior means and backward
            sampling through the contraction.

        Raises:
            TMCError: ``differentiable`` with a sharded estimator.
        """
        if differentiable and self.shard is not None:
            raise TMCError("posterior(differentiable=True) is not supported by a sharded estimator; use "
                           "log_marginal for gradients")
        tr, plan, norm = self._trace(data)
        return Posterior(self.model, tr, plan, norm, lambda fs: self._log_sum(plan, fs, share=False), self._rng,
                         differentiable=differentiable)

    def moments(self, data: Mapping[str, object],
                statistics: Optional[Mapping[str, Callable[[torch.Tensor], torch.Tensor]]] = None
                ) -> Dict[str, torch.Tensor]:
        """Posterior expectations ``E[f(z)]`` per plate element, from one TMC draw (`Posterior.mean`).

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``.
            statistics: latent -> ``f``, applied to samples ``(*batch, *plates, K, *event)`` and returning
                ``(*batch, *plates, K, *out)``; default: the identity for every latent (posterior means).

        Returns:
            latent -> ``(*batch, *plates of the latent, *out)``.  Self-normalised: consistent as K grows.
        """
        post = self.posterior(data)
        fns = statistics if statistics is not None else {n: None for n in self.model.latents()}
        return {n: post.mean(n, fn) for n, fn in fns.items()}

    def marginals(self, data: Mapping[str, object]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Each latent's samples and their posterior weights, from one TMC draw.

        Returns:
            latent -> ``(samples (*batch, *plates, K, *event), weights (*batch, *plates, K))``; the weights sum
            to 1 over K (`Posterior.marginals`).
        """
        post = self.posterior(data)
        return {n: (post.samples[n], post.marginals[n]) for n in self.model.latents()}

    def importance_sample(self, data: Mapping[str, object], num_samples: int) -> Dict[str, torch.Tensor]:
        """``num_samples`` joint samples from one TMC draw's posterior over sample combinations.

        Drawn through the contraction (`Posterior.sample`): each is a combination of the draw's samples, with
        probability proportional to its importance weight.

        Returns:
            latent -> ``(num_samples, *batch, *plates, *event)``.
        """
        return {n: v for n, v in self.posterior(data).sample(num_samples).items() if not n.startswith("@")}

    def __repr__(self) -> str:
        return f"TMC(K={self.K}, plan={self.plan if self._plans else 'built at first evaluation'})"


def _check_groups(model: Model, groups: Sequence[Sequence[str]], K: Mapping[str, int]) -> Tuple[Tuple[str, ...], ...]:
    """Validate ``groups``: sampled latents, each in one group, one K and the same plates within a group."""
    if isinstance(groups, str) or any(isinstance(g, str) for g in groups):
        raise TMCError(f"groups must be a list of lists of latent names, got {groups!r}")
    out = tuple(tuple(g) for g in groups)
    seen: Dict[str, int] = {}
    for k, members in enumerate(out):
        if len(members) < 2:
            raise TMCError(f"group {list(members)}: a group needs at least two latents")
        for n in members:
            if n not in K:
                raise TMCError(f"group {list(members)}: {n!r} is not a sampled latent; sampled latents: {list(K)}")
            if n in seen:
                raise TMCError(f"group {list(members)}: latent {n!r} is already in group {list(out[seen[n]])}")
            seen[n] = k
        if len({K[n] for n in members}) != 1:
            raise TMCError(f"group {list(members)}: its latents have different K {[K[n] for n in members]}; a group "
                           "shares one index of K samples")
        plates = {model.sites[n].plates for n in members}
        if len(plates) != 1:
            raise TMCError(f"group {list(members)}: its latents live in different plates "
                           f"{ {n: list(model.sites[n].plates) for n in members} }; a group shares one index")
    return out


def _in_support(layout: Layout, data: Mapping[str, object], supports: Mapping[str, constraints.Constraint]) -> bool:
    """Whether every observed value lies in the support recorded for it (one host sync)."""
    flags = [c.check(layout.data_value(n, data[n])).all() for n, c in supports.items()]
    return not flags or bool(torch.stack(flags).all())


def _check_shard(model: Model, shard: Optional[Shard], backend: str) -> Optional[Shard]:
    """Refuse what cannot be sharded along ``shard.plate``, naming the plate, site and argument."""
    if shard is None:
        return None
    if not isinstance(shard, Shard):
        raise TMCError(f"shard must be a tmcgraph.distributed.Shard, got {type(shard).__name__}")
    plate = shard.plate
    if plate not in model.plates:
        raise TMCError(f"Shard: plate {plate!r} is not declared in the model; plates: {list(model.plates)}")
    if backend != "eager":
        raise TMCError("sharded evaluation runs on the eager backend; drop backend='compiled'")
    for name in model.latents():
        site = model.sites[name]
        if plate in site.plates:
            continue
        sharded = [p for p in site.proposal_parents if plate in model.sites[p].plates]
        if sharded:
            raise TMCError(
                f"latent {name!r} is outside the sharded plate {plate!r}, but its proposal reads {sharded}, which "
                f"{'is' if len(sharded) == 1 else 'are'} in {plate!r}: each process holds only its shard, so the "
                f"processes would draw different samples of {name!r}. Shard another plate, or make {name!r}'s "
                "proposal independent of the sharded data"
            )
    return shard
