"""The DReGs surrogate's gradient against the gradient it estimates, on two models.

``grad_phi E[log P_TMC]`` is estimated without bias by the reparameterised
gradient of ``log_marginal``; the surrogate (``dregs_surrogate()``) must agree
with it in expectation, with a smaller variance, while the paper's eq. 60
(``form="paper"``) does not.  Every proposal parameter has one copy per draw
(the data-batch dim), so one backward pass gives every draw's gradient.

Run: python examples/dregs_gradients.py [--draws 40000]
"""

import argparse
import math

import torch
from torch.distributions import Normal

import tmcgraph


def two_latents(draws):
    """a, b ~ N(0, 1), x ~ N(a + b, 0.7^2), x = 1.2; q = N(loc, e^log_scale) for each; K = 3."""
    loc = torch.nn.Parameter(torch.tensor([0.3, -0.2]).repeat(draws, 1))
    log_scale = torch.nn.Parameter(torch.tensor([0.1, -0.3]).repeat(draws, 1))
    shape = (draws, 1, 1)  # (draws, index dim of a, index dim of b)
    m = tmcgraph.Model()
    for j, name in enumerate("ab"):
        m.latent(name, prior=lambda: Normal(0.0, 1.0),
                 proposal=lambda j=j: Normal(loc[:, j].reshape(shape), log_scale[:, j].exp().reshape(shape)))
    m.observe("x", lambda a, b: Normal(a + b, 0.7))
    names = ["loc a", "loc b", "log_scale a", "log_scale b"]
    return m.compile(K=3), {"x": torch.full((draws,), 1.2)}, [loc, log_scale], names


def plated(draws, N=8):
    """mu ~ N(0, 1), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5^2), N = 8; q(mu) = N(0, 1), q(z_n) = N(0.2, e^-0.5); K = 4."""
    mu_params = torch.nn.Parameter(torch.zeros(draws, 2))
    z_params = torch.nn.Parameter(torch.tensor([0.2, -0.5]).repeat(draws, 1))
    one = (draws, 1, 1, 1)  # (draws, index dim of mu, index dim of z, plate N)
    m = tmcgraph.Model()
    m.plate("N", N)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0),
             proposal=lambda: Normal(mu_params[:, 0].reshape(one), mu_params[:, 1].exp().reshape(one)))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"],
             proposal=lambda: Normal(z_params[:, 0].reshape(one), z_params[:, 1].exp().reshape(one)))
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    x = torch.linspace(-1.0, 2.0, N)
    names = ["loc mu", "log_scale mu", "loc z", "log_scale z"]
    return m.compile(K=4), {"x": x.expand(draws, N)}, [mu_params, z_params], names


GRADIENTS = {
    "reparameterised": lambda est, data: est.log_marginal(data),
    "dregs (ours)": lambda est, data: est.dregs_surrogate(data),
    "dregs (paper)": lambda est, data: est.dregs_surrogate(data, form="paper"),
}


def compare(build, draws, seed=0):
    """name -> (mean gradient, standard error, per-draw variance), each ``(number of parameters,)``."""
    out = {}
    for name, objective in GRADIENTS.items():
        est, data, params, labels = build(draws)
        torch.manual_seed(seed)
        grads = torch.autograd.grad(objective(est, data).sum(), params)
        g = torch.cat([g.reshape(draws, -1) for g in grads], 1).double()
        out[name] = (g.mean(0), g.std(0) / math.sqrt(draws), g.var(0))
    return out, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=40000, help="independent gradients (default 40000)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    for title, build in (("two latents, K=3", two_latents), ("plated mu -> z_n -> x_n, N=8, K=4", plated)):
        out, labels = compare(build, args.draws)
        print(f"== {title}: mean gradient +- standard error over {args.draws} draws [per-draw variance] ==")
        print(f"{'':<17}" + "".join(f"{label:>28}" for label in labels))
        for name, (mean, se, var) in out.items():
            cells = "".join(f"{m:>10.4f} +-{s:.4f} [{v:>7.3g}]" for m, s, v in zip(mean, se, var))
            print(f"{name:<17}{cells}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
