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


def test_step_program_gradients_and_underflow_on_cuda():
    """The step program (whole-plan backward, deferred underflow check) on CUDA equals the CPU evaluation."""
    graph = random_factor_graph(5, plates=True)
    factors = random_factors(graph, seed=5, batch_shape=(3,), scale=300.0)  # far-apart maxima: trips, then exact
    plan = graph.compile()
    cpu = {n: f.clone().requires_grad_() for n, f in factors.items()}
    cuda = {n: f.cuda().requires_grad_() for n, f in factors.items()}
    out_cpu, out_cuda = plan.log_sum(cpu), plan.log_sum(cuda)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu)
    for a, b in zip(torch.autograd.grad(out_cpu.sum(), list(cpu.values())),
                    torch.autograd.grad(out_cuda.sum(), list(cuda.values()))):
        torch.testing.assert_close(b.cpu(), a)


def test_scan_families_and_batched_sites_on_cuda():
    g = tmcgraph.FactorGraph()
    for i in range(16):
        g.index(f"z{i}", 3)
        g.factor(f"u{i}", [f"z{i}"])
    for i in range(1, 16):
        g.factor(f"f{i}", [f"z{i - 1}", f"z{i}"])
    factors = random_factors(g, seed=1)
    plan = g.compile(scan="always")
    torch.testing.assert_close(plan.log_sum({n: f.cuda() for n, f in factors.items()}).cpu(), plan.log_sum(factors))
    loc = torch.zeros(8, device="cuda", requires_grad=True)
    fam = tmcgraph.Model()
    fam.markov("z", 8, init=lambda: Normal(torch.zeros((), device="cuda"), 1.0),
               transition=lambda prev: Normal(0.9 * prev, 0.5), proposal=lambda t: Normal(loc[t], 1.0))
    fam.observe_each("x", "z", lambda z: Normal(z, 1.0))
    sites = tmcgraph.Model()
    sites.latent("z0", prior=lambda: Normal(torch.zeros((), device="cuda"), 1.0), proposal=lambda: Normal(loc[0], 1.0))
    for t in range(1, 8):
        sites.latent(f"z{t}", prior=lambda prev: Normal(0.9 * prev, 0.5), parents=[f"z{t - 1}"],
                     proposal=lambda t=t: Normal(loc[t] + 0.0 * t, 1.0), proposal_parents=[])
    for t in range(8):
        sites.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
    x = torch.randn(8, device="cuda")
    for model, names in ((fam, "x_{}"), (sites, "x{}")):
        est = model.compile(K=4)
        data = {names.format(t): x[t] for t in range(8)}
        for _ in range(2):  # the second evaluation batches the verified groups
            out = est.log_marginal(data)
            assert out.device.type == "cuda" and torch.isfinite(out)
            (grad,) = torch.autograd.grad(out, [loc])
            assert torch.isfinite(grad).all()
    assert all(est._groups.verified.values())
