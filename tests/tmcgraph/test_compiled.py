"""backend="compiled": the whole plan as one torch.compile'd program, against eager and brute force.

Each compile takes seconds on a CPU, so the graphs are few and small.
"""

import math

import pytest
import torch

import tmcgraph
from tmcgraph import TMCError
from tmcgraph.testing import brute_force_log_sum, random_factor_graph, random_factors

pytestmark = pytest.mark.slow


def _plated():
    g = tmcgraph.FactorGraph()
    g.plate("N", 3)
    g.index("t", 4)
    g.index("z", 3, plates=["N"])
    g.index("a", 3)
    g.index("b", 2)
    g.factor("prior", ["t"]).factor("lik", ["t", "z"], plates=["N"]).factor("ab", ["t", "a", "b"])
    g.factor("b_only", ["b"])
    return g


@pytest.mark.parametrize("graph", ["plated", "random"])
def test_values_and_gradients_equal_eager_and_brute_force(graph):
    g = _plated() if graph == "plated" else random_factor_graph(3, plates=True)
    plan = g.compile()
    factors = random_factors(g, seed=2, dtype=torch.float64)
    name = next(iter(factors))
    factors[name].view(-1)[0] = -math.inf  # a zero-probability entry
    batch = {k: v.expand(2, *v.shape).clone() for k, v in factors.items()}  # a batch dim too
    compiled = plan.log_sum(batch, backend="compiled")
    assert torch.allclose(compiled, plan.log_sum(batch), rtol=1e-12)
    assert torch.allclose(compiled[0], brute_force_log_sum(g, factors), rtol=1e-10)
    leaves = {k: v.clone().requires_grad_() for k, v in factors.items()}
    got = torch.autograd.grad(plan.log_sum(leaves, backend="compiled"), list(leaves.values()))
    want = torch.autograd.grad(plan.log_sum(leaves), list(leaves.values()))
    for x, y in zip(got, want):
        assert torch.isfinite(x).all() and torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_underflow_falls_back_to_the_exact_eager_evaluation():
    """float32, the maxima of the two operands at different positions of the summed index: every shifted sum
    is ``2 exp(-200)``, zero in float32, so the compiled program's own value is wrong; its flag sends the
    evaluation to the exact eager kernels."""
    g = tmcgraph.FactorGraph()
    for name in ("i", "j", "k"):
        g.index(name, 3 if name != "j" else 2)
    g.factor("f", ["i", "j"]).factor("h", ["j", "k"])
    plan = g.compile()
    gen = torch.Generator().manual_seed(0)
    f = torch.tensor([0.0, -200.0]).expand(3, 2) + 0.1 * torch.randn(3, 2, generator=gen)
    h = torch.tensor([[-200.0], [0.0]]).expand(2, 3) + 0.1 * torch.randn(2, 3, generator=gen)
    factors = {"f": f, "h": h}
    exact = brute_force_log_sum(g, {k: v.double() for k, v in factors.items()})
    got = plan.log_sum(factors, backend="compiled")
    assert abs(got.item() - exact.item()) < 1e-5 * abs(exact.item())
    assert torch.equal(got, plan.log_sum(factors))
    # power: the compiled program alone (no fallback) is far off and its flag is below the threshold
    from tmcgraph import evaluate

    program = evaluate._compiled[plan][(tuple(f.shape), tuple(h.shape))]
    assert program.program is evaluate.lower(plan, [tuple(f.shape), tuple(h.shape)])  # the eager backend's program
    value, flag = program.raw([f, h])
    assert flag < math.sqrt(torch.finfo(torch.float32).tiny) and abs(value.item() - exact.item()) > 50


def test_backend_errors():
    g = _plated()
    factors = random_factors(g, seed=0)
    with pytest.raises(TMCError, match=r"unknown backend='jit'; expected one of \['eager', 'compiled'\]"):
        g.compile().log_sum(factors, backend="jit")
    with pytest.raises(TMCError, match="backend='compiled' evaluates unsliced"):
        g.compile(memory_limit=1000).log_sum(factors, backend="compiled")


def test_a_declared_model_with_the_compiled_backend():
    from torch.distributions import Normal

    loc = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    m = tmcgraph.Model()
    m.plate("N", 4)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc, 1.5))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda x: Normal(0.5 * x, 1.2), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    data = {"x": torch.tensor([0.2, 1.1, -0.4, 0.8], dtype=torch.float64)}
    eager, compiled = m.compile(K=5), m.compile(K=5, backend="compiled")
    for method in ("log_marginal", "dregs_surrogate"):
        values, grads = [], []
        for est in (eager, compiled):
            torch.manual_seed(0)
            value = getattr(est, method)(data)
            values.append(value)
            grads.append(torch.autograd.grad(value, [loc])[0])
        assert torch.allclose(values[0], values[1], rtol=1e-12) and torch.allclose(grads[0], grads[1], rtol=1e-10)
    torch.manual_seed(0)
    post = compiled.posterior(data)
    torch.manual_seed(0)
    assert torch.allclose(post.mean("mu"), eager.posterior(data).mean("mu"), rtol=1e-10)


def test_distribution_validation_is_left_as_the_user_set_it():
    """torch.compile's first use turns torch.distributions validation off process-wide; we restore it."""
    from torch.distributions import Distribution

    g = _plated()
    before = Distribution._validate_args
    g.compile().log_sum(random_factors(g, seed=5), backend="compiled")
    assert Distribution._validate_args == before


def _chain2(loc):
    from torch.distributions import Normal

    m = tmcgraph.Model()
    m.latent("z1", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc, 1.3))
    m.latent("z2", prior=lambda z1: Normal(z1, 1.0), proposal=lambda: Normal(0.0, 1.6))
    m.observe("x", lambda z2: Normal(z2, 1.0))
    return m


def test_the_whole_objective_is_compiled_and_unbiased():
    """backend="compiled": sampling, factors and contraction in one program from the second evaluation on."""
    from torch.distributions import Normal

    torch.manual_seed(0)
    loc = torch.tensor(0.3, requires_grad=True)
    est = _chain2(loc).compile(K=4, backend="compiled")
    x = torch.tensor(1.7)
    data = {"x": x.expand(40000)}
    est.log_marginal(data)  # eager, with every check
    assert list(est._objectives.values()) == [()]
    log_p = est.log_marginal(data)
    assert len(next(iter(est._objectives.values()))) == 4  # the compiled objective was built and used
    r = torch.exp(log_p.double() - Normal(0.0, math.sqrt(3.0)).log_prob(x).item())
    assert abs(r.mean().item() - 1.0) < 4.5 * r.std().item() / math.sqrt(r.numel()) + 1e-3
    (grad,) = torch.autograd.grad(log_p.mean(), [loc])
    assert torch.isfinite(grad) and grad != 0


def test_the_compiled_objective_falls_back_to_the_exact_contraction_of_the_same_draw(monkeypatch):
    from torch.distributions import Normal

    m = tmcgraph.Model()
    m.latent("z1", prior=lambda: Normal(0.0, 1.0))
    m.latent("z2", prior=lambda z1: Normal(z1, 0.01), proposal=lambda: Normal(0.0, 2.0))
    m.observe("x1", lambda z1: Normal(z1, 1e-3))  # log-factors of magnitude ~1e6: the fast path underflows
    m.observe("x2", lambda z2: Normal(z2, 1e-3))
    est = m.compile(K=8, backend="compiled")
    data = {"x1": torch.tensor(2.0), "x2": torch.tensor(-2.0)}
    est.log_marginal(data)
    calls = []
    exact = est.evaluator.log_sum
    monkeypatch.setattr(est.evaluator, "log_sum",
                        lambda plan, factors, **kw: calls.append(kw) or exact(plan, factors, **kw))
    for _ in range(3):
        out = est.log_marginal(data)
        assert torch.isfinite(out)
    assert calls and all(kw == {"backend": "eager"} for kw in calls)  # the flag tripped: the draw contracted exactly


def _bernoulli_model():
    from torch.distributions import Bernoulli, Normal

    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 2.0))
    m.observe("x", lambda z: Bernoulli(logits=z))
    return m


def test_the_compiled_objective_checks_the_data_on_every_call():
    """The first call per layout runs eagerly; the data of every later call are checked too (outside the
    program), with the eager error naming the observation."""
    est = _bernoulli_model().compile(K=4, backend="compiled")
    assert torch.isfinite(est.log_marginal({"x": torch.tensor(1.0)}))
    assert torch.isfinite(est.log_marginal({"x": torch.tensor(0.0)}))  # compiled
    for bad in (0.5, 2.0, -1.0):
        with pytest.raises(TMCError, match=r"observation 'x': the value lies outside the support \(integers in "
                           r"\[0, 1\]\) of its likelihood Bernoulli"):
            est.log_marginal({"x": torch.tensor(bad)})
    for bad, what in ((math.nan, "NaN"), (math.inf, "an infinite value")):
        with pytest.raises(TMCError, match=f"observation\\(s\\) \\['x'\\]: the observed value contains {what}"):
            est.log_marginal({"x": torch.tensor(bad)})
    assert torch.isfinite(est.log_marginal({"x": torch.tensor(1.0)}))  # still compiled, still right


def test_a_user_function_that_raises_inside_the_program_gives_the_eager_error():
    from torch.distributions import Normal

    state = {"fail": False}

    def likelihood(z):
        if state["fail"]:
            raise RuntimeError("the sensor is offline")
        return Normal(z, 1.0)

    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", likelihood)
    est = m.compile(K=4, backend="compiled")
    for _ in range(2):
        assert torch.isfinite(est.log_marginal({"x": torch.tensor(0.3)}))
    state["fail"] = True
    with pytest.raises(TMCError, match="observation 'x' likelihood: the function raised RuntimeError: the sensor is "
                       "offline"):
        est.log_marginal({"x": torch.tensor(0.3)})


def test_a_proposal_narrower_than_its_prior_is_refused_by_the_compiled_program_too():
    """Tensor bounds are compared inside the program (no host sync there); a failed check sends the call to
    the eager evaluation, which raises naming the latent."""
    from torch.distributions import Normal, Uniform

    hi = torch.tensor(2.0)
    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Uniform(0.0, 1.0), proposal=lambda: Uniform(torch.tensor(0.0), hi))
    m.observe("x", lambda z: Normal(z, 1.0))
    est = m.compile(K=4, backend="compiled")
    for _ in range(2):
        assert torch.isfinite(est.log_marginal({"x": torch.tensor(0.5)}))
    hi.fill_(0.5)  # the proposal now misses (0.5, 1]
    with pytest.raises(TMCError, match="latent 'z': the proposal's support .* does not contain the prior's"):
        est.log_marginal({"x": torch.tensor(0.5)})
