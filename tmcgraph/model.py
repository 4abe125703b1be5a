"""Declared models: latents with priors and proposals, observations, plates.

A `Model` is declared once.  Its structure (who depends on whom, which
plates) is resolved when an estimator is built; the distributions are built by
the user's functions at every evaluation, from the samples of their parents.

Tensor layout
-------------
Every value an estimator hands to a user function (a parent's samples, an
observed value) and every distribution such a function returns uses one
positional layout, like Pyro's enumeration dims::

    (*data_batch, *index dims, *plate dims, *event dims)

* ``data_batch``: the leading batch dims of the data (several datasets at once);
  each element gets its own independent samples.
* ``index dims``: one dim per sample index (TMC: one per latent, in
  topological order; IWAE and SMC: one shared particle dim, plus one per
  enumerated latent).  A latent's samples have size K along their own index dim
  and size 1 along every other index dim.
* ``plate dims``: one dim per plate, in declaration order (the last declared
  plate is the rightmost batch dim); size 1 where a value is not in the plate.

So a parameter that varies over plate ``"N"`` alone (the only plate) has shape
``(N,)``; with plates ``"N", "T"`` a per-``N`` parameter has shape ``(N, 1)``.
Vector-valued latents need event dims (``Independent(Normal(...), 1)``,
``MultivariateNormal``); a distribution whose batch shape does not fit the layout
is an error naming the site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from .declaration import DistFn, Family, ModelBase, Site
from .estimators import TMC

if TYPE_CHECKING:
    from .distributed import Shard

__all__ = ["DistFn", "Family", "Model", "Site"]


class Model(ModelBase):
    """A probabilistic model declared site by site, compiled into estimators.

    Example::

        m = Model()
        m.plate("N", 5)
        m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 2.0))
        m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.5), plates=["N"])
        m.latent("c", prior=lambda: Bernoulli(0.3), enumerate=True, plates=["N"])
        m.observe("x", lambda z, c: Normal(z + 2.0 * c, 1.0), plates=["N"])
        est = m.compile(K=16)
        log_p = est.log_marginal({"x": x})      # x: (5,) or (*batch, 5)

    Parents are named by the argument names of the functions (arguments with
    defaults are not parents), or explicitly with ``parents=[...]`` (then the
    function is called positionally).  Sites may be declared in any order;
    unknown names, cycles and plate mismatches are reported when the parent is
    known (at declaration, or at compile time for forward references).
    See the module docstring for the tensor layout the functions see.
    """

    def compile(
        self,
        K: Union[int, Mapping[str, int]] = 16,
        *,
        optimize: str = "auto",
        memory_limit: Optional[int] = None,
        backend: str = "eager",
        shard: Optional["Shard"] = None,
        scan: str = "auto",
        groups: Sequence[Sequence[str]] = (),
    ) -> TMC:
        """Build the TMC estimator: the factor graph of sample indices, compiled once.

        Args:
            K: samples per latent: an int for all, or ``{latent: K}`` for every
                sampled latent (enumerated latents use their support size).
            optimize: the path optimizer, as in `tmcgraph.FactorGraph.compile`.
            memory_limit: the largest intermediate in elements, as in
                `tmcgraph.FactorGraph.compile`.
            backend: ``"eager"`` (default) or ``"compiled"``: ``log_marginal``
                then runs the whole objective (sampling, factors, contraction) as
                one ``torch.compile``'d program from the second evaluation of each
                data layout on (the first runs eagerly, with every check; the
                compile itself takes seconds to minutes on a CPU); other methods
                compile the contraction only (`tmcgraph.evaluate.compiled`).
            shard: evaluate with this plate split across the processes of a
                ``torch.distributed`` group (`tmcgraph.distributed.Shard`;
                this model declares the plate with the size of this process's shard).
            scan: contract chains of factors by a parallel scan: ``"auto"``, ``"always"``
                or ``"never"``, as in `tmcgraph.FactorGraph.compile`.
            groups: lists of sampled latents (same plates, same K) that share one sample
                index: the k-th samples of a group's latents are drawn together (each from its
                proposal given the same sample's group parents) and weighed as one joint sample,
                as IWAE weighs all latents.  A group of g latents costs K where separate indices
                cost up to K^g in the factors that touch them all (the massively parallel
                papers group a model's global latents so).

        Returns:
            a `tmcgraph.TMC` estimator.
        """
        return TMC(self, K, optimize=optimize, memory_limit=memory_limit, backend=backend, shard=shard, scan=scan,
                   groups=groups)
