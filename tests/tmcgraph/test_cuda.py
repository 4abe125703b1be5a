"""CUDA: the evaluator, a declared model's estimators and the sharded hook on a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import tmcgraph
from tmcgraph.testing import brute_force_log_sum, random_factor_graph, random_factors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: checks the evaluator and estimators on a GPU")


def test_plan_on_cuda_equals_cpu_and_brute_force():
    graph = random_factor_graph(3, plates=True)
    factors = random_factors(graph, seed=3, batch_shape=(2,))
    plan = graph.compile()
    cpu = plan.log_sum(factors)
    cuda = {n: f.cuda().requires_grad_() for n, f in factors.items()}
    out = plan.log_sum(cuda)
    torch.testing.assert_close(out.cpu(), cpu)
    torch.testing.assert_close(cpu, brute_force_log_sum(graph, factors))
    out.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in cuda.values())


def test_declared_model_on_cuda():
    m = tmcgraph.Model()
    m.plate("N", 6)
    m.latent("mu", prior=lambda: Normal(torch.zeros((), device="cuda"), 1.0))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    x = torch.randn(6, device="cuda")
    est = m.compile(K=8)
    lp = est.log_marginal({"x": x})
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    post = est.posterior({"x": x})
    assert post.marginals["mu"].device.type == "cuda"
