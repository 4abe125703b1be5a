"""Pyro's TraceTMC_ELBO against tmcgraph.pyro.TMC_ELBO on two models whose p(x) is known exactly.

1. A Gaussian chain with a non-factorised guide, q(z2 | z1): Pyro weights each sample by the conditional
   density at its paired ancestor instead of the mixture density it was drawn from.
2. A mixture with a Gaussian prior on the three means and the assignments enumerated in the model
   (p(x) by summing over the 3^N assignments of a Gaussian marginal).

For each, ``E[exp(log P)] / p(x)`` (1 for an unbiased estimator) and the mean of ``log P`` (at most
``log p(x)`` for an unbiased one, by Jensen) over ``--runs`` estimates.

Run: python examples/pyro_biases.py [--runs 2000] [--K 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceTMC_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from tmcgraph.pyro import TMC_ELBO


def chain_model(x):
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def chain_guide(x):
    z1 = pyro.sample("z1", dist.Normal(0.5, 1.0))
    pyro.sample("z2", dist.Normal(z1, 0.3))


def mixture_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
    with pyro.plate("N", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(Vindex(mu)[..., c], 1.0), obs=x)


def mixture_guide(x):
    pyro.sample("mu", dist.Normal(torch.tensor([-2.0, 0.0, 2.0]), 1.0).to_event(1))


def mixture_exact(x: torch.Tensor) -> float:
    """log p(x): given the assignments, x is Gaussian with covariance 4 A A^T + I."""
    terms = []
    for c in itertools.product(range(3), repeat=x.shape[0]):
        a = torch.nn.functional.one_hot(torch.tensor(c), 3).to(x.dtype)
        cov = 4 * a @ a.T + torch.eye(x.shape[0], dtype=x.dtype)
        terms.append(torch.distributions.MultivariateNormal(torch.zeros_like(x), cov).log_prob(x))
    return (torch.logsumexp(torch.stack(terms), 0) - x.shape[0] * math.log(3)).item()


def summary(values: torch.Tensor, exact: float) -> str:
    ratio = (values - exact).exp()
    se = ratio.std().item() / math.sqrt(len(values))
    return f"E[P]/p = {ratio.mean().item():.3f} +- {se:.3f}, mean log P = {values.mean().item():.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--K", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    cases = [("chain, q(z2 | z1)", chain_model, chain_guide, torch.tensor(1.5),
              dist.Normal(0.0, math.sqrt(3.0)).log_prob(torch.tensor(1.5)).item(), 0),
             ("mixture, c enumerated in the model", mixture_model, mixture_guide, torch.tensor([-1.5, 0.3, 2.2]),
              None, 1)]
    for name, model, guide, x, exact, nesting in cases:
        exact = mixture_exact(x) if exact is None else exact
        ours = torch.stack([TMC_ELBO(num_particles=args.K, max_plate_nesting=nesting).log_marginal(model, guide, x)
                            .detach() for _ in range(args.runs)])
        pyro_guide = config_enumerate(guide, default="parallel", num_samples=args.K, tmc="mixture")
        theirs = torch.stack([-TraceTMC_ELBO(max_plate_nesting=nesting).differentiable_loss(model, pyro_guide, x)
                              .detach() for _ in range(args.runs)])
        print(f"{name}: log p(x) = {exact:.3f}")
        print(f"  tmcgraph TMC_ELBO     {summary(ours, exact)}")
        print(f"  Pyro TraceTMC_ELBO    {summary(theirs, exact)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
