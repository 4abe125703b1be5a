"""Pyro's TraceTMC_ELBO against tmcgraph.pyro.TMC_ELBO on three models whose p(x) is known exactly.

1. A Gaussian chain with a non-factorised guide, q(z2 | z1): Pyro weights each sample by the conditional
   density at its paired ancestor instead of the mixture density it was drawn from.
2. A mixture with a Gaussian prior on the three means and the assignments enumerated in the model
   (p(x) by summing over the 3^N assignments of a Gaussian marginal).

For each, ``E[exp(log P)] / p(x)`` (1 for an unbiased estimator) and the mean of ``log P`` (at most
``log p(x)`` for an unbiased one, by Jensen) over ``--runs`` estimates.

3. A subsampled plate with a latent per element (N = 100 identical data points, 10 per subsample): the
   objective is (N / B) times the subsample's log-likelihood, which for identical points is the full data's
   ``log p(x)`` exactly.  Pyro raises each factor to the power N / B before the sum over samples.  The mean
   of ``log P`` over ``--subsample-runs`` estimates at each of ``--subsample-Ks``: ours converges to
   ``log p(x)`` as K grows, Pyro's to another number.

Run: python examples/pyro_biases.py [--runs 2000] [--K 8] [--seed 0] [--subsample-runs 200]
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


def subsampled_model(x):
    with pyro.plate("N", x.shape[0], subsample_size=10) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def subsampled_guide(x):
    with pyro.plate("N", x.shape[0], subsample_size=10):
        pyro.sample("z", dist.Normal(0.5, 1.0))


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
    parser.add_argument("--subsample-runs", type=int, default=200)
    parser.add_argument("--subsample-Ks", type=int, nargs="+", default=[8, 64, 512])
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
    x = torch.full((100,), 1.5)
    exact = 100 * dist.Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(1.5)).item()
    print(f"subsampled plate with local latents (N=100, B=10): log p(x) = {exact:.3f}")
    for k in args.subsample_Ks:
        ours = torch.stack([TMC_ELBO(num_particles=k, max_plate_nesting=1).log_marginal(
            subsampled_model, subsampled_guide, x).detach() for _ in range(args.subsample_runs)])
        pyro_guide = config_enumerate(subsampled_guide, default="parallel", num_samples=k, tmc="mixture")
        theirs = torch.stack([-TraceTMC_ELBO(max_plate_nesting=1).differentiable_loss(
            subsampled_model, pyro_guide, x).detach() for _ in range(args.subsample_runs)])
        se = math.sqrt(args.subsample_runs)
        print(f"  K={k:<4d} mean log P: tmcgraph {ours.mean().item():.2f} +- {ours.std().item() / se:.2f}, "
              f"Pyro {theirs.mean().item():.2f} +- {theirs.std().item() / se:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
