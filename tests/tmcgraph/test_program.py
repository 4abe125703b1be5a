"""The lowered step programs (tmcgraph.evaluate) against brute force and against their exact mode."""

import math

import pytest
import torch

import tmcgraph
from tmcgraph import evaluate
from tmcgraph.evaluate.program import EXACT_STICKY
from tmcgraph.testing import STRUCTURES, brute_force_log_sum, random_factor_graph, random_factors


def _exact_steps(plan, f):
    """The same plan with every pairwise step taken by the exact kernel under ordinary autograd."""
    tensors = [f[spec.name] for spec in plan.inputs]
    program = evaluate.lower(plan, [tuple(t.shape) for t in tensors])
    return program._evaluate(tensors, 0)[0] + plan.constant


@pytest.mark.parametrize("structure", list(STRUCTURES) + ["plated"])
@pytest.mark.parametrize("seed", range(6))
def test_gradients_match_brute_force(structure, seed):
    plates = structure == "plated"
    g = random_factor_graph(seed, structure="random" if plates else structure, plates=plates)
    batch = [(), (2,), (3, 1)][seed % 3]
    f = random_factors(g, seed=seed, batch_shape=batch, scale=2.0, requires_grad=True)
    plan = g.compile()
    out = plan.log_sum(f)
    assert type(out.grad_fn).__name__ != "PairFunctionBackward"
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, list(f.values()), weights)
    want_out = brute_force_log_sum(g, f)
    want = torch.autograd.grad(want_out, list(f.values()), weights)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    for name, x, y in zip(f, got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=name)


def test_batch_dims_broadcast_and_gradients_of_broadcast_factors():
    """A factor with a size-1 batch dim gets its gradient summed over that dim (as autograd would)."""
    g = tmcgraph.FactorGraph().plate("N", 3).index("t", 4).index("z", 2, plates=["N"])
    g.factor("prior", ["t"]).factor("lik", ["t", "z"], plates=["N"])
    gen = torch.Generator().manual_seed(0)
    prior = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    lik = torch.randn(6, 3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    out = g.compile().log_sum({"prior": prior, "lik": lik})
    assert out.shape == (5, 6)
    out.sum().backward()
    got = prior.grad.clone(), lik.grad.clone()
    prior.grad = lik.grad = None
    want = torch.stack([torch.stack([brute_force_log_sum(g, {"prior": prior[i, 0], "lik": lik[j]})
                                     for j in range(6)]) for i in range(5)])
    torch.testing.assert_close(out, want)
    want.sum().backward()
    torch.testing.assert_close(got[0], prior.grad)
    torch.testing.assert_close(got[1], lik.grad)


def test_float32_gradients_within_rounding_of_the_per_step_kernels():
    for seed in range(8):
        g = random_factor_graph(seed, structure="random", plates=seed % 2 == 0)
        f = random_factors(g, seed=seed, batch_shape=(2,), scale=3.0, requires_grad=True)
        f = {k: v.detach().float().requires_grad_() for k, v in f.items()}
        plan = g.compile()
        got = torch.autograd.grad(plan.log_sum(f).sum(), list(f.values()))
        want = torch.autograd.grad(_exact_steps(plan, f).sum(), list(f.values()))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


_EQ = "ij,jk,kl->ikl"


def _far_apart():
    """Per-operand maxima at different contracted positions, far apart: the fast path's shifted sum
    underflows to 0 in float32 (appendix E of the TMC paper)."""
    gap = 200.0
    a = torch.tensor([[0.0, -gap], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[-gap, 0.0], [0.0, 0.0]], dtype=torch.float64)
    c = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = (a[:, :, None] + b[None]).logsumexp(1)[:, :, None] + c[None]
    return [x.float() for x in (a, b, c)], [a, b, c], want


def _program_of(ops):
    plan = tmcgraph.log_einsum_plan(_EQ, *[o.shape for o in ops])
    return evaluate.lower(plan, [tuple(o.shape) for o in ops])


def test_underflow_trips_once_and_the_result_is_exact():
    ops, _, want = _far_apart()
    plan = tmcgraph.log_einsum_plan(_EQ, *[o.shape for o in ops])
    state = evaluate.RunState()
    got = evaluate.run(plan, ops, state=state)
    program = _program_of(ops)
    assert state.left(program) == EXACT_STICKY  # the check tripped
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # the caller's next evaluations start exactly at the affected step, and stay exact
    for _ in range(3):
        torch.testing.assert_close(evaluate.run(plan, ops, state=state).double(), want, rtol=1e-6, atol=0)
    assert state.left(program) == EXACT_STICKY - 3
    # without a state every evaluation decides alone, and is exact too
    torch.testing.assert_close(tmcgraph.log_einsum(_EQ, *ops).double(), want, rtol=1e-6, atol=0)


def test_the_adaptive_state_belongs_to_the_caller_not_to_the_shared_plan():
    """Two callers of one plan (the compiler shares plans between graphs of one structure): one's trip
    changes nothing for the other, and a plan or program holds no such state."""
    ops, _, want = _far_apart()
    plan = tmcgraph.log_einsum_plan(_EQ, *[o.shape for o in ops])
    a, b = evaluate.RunState(), evaluate.RunState()
    evaluate.run(plan, ops, state=a)
    program = _program_of(ops)
    assert a.left(program) == EXACT_STICKY and b.left(program) == 0
    calm = [torch.zeros_like(o) for o in ops]  # nothing to trip on
    for _ in range(2):
        evaluate.run(plan, calm, state=b)
    assert b.left(program) == 0 and a.left(program) == EXACT_STICKY
    assert not [k for k in vars(program) if "exact" in k] and not [k for k in vars(plan) if "exact" in k]


def test_estimators_of_one_structure_share_the_plan_but_not_the_state():
    from torch.distributions import Normal

    def model():
        m = tmcgraph.Model()
        m.latent("z", prior=lambda: Normal(0.0, 1.0))
        m.observe("x", lambda z: Normal(z, 1.0))
        return m

    one, two = model().compile(K=3), model().compile(K=3)
    assert one.plan is two.plan and one.evaluator.state is not two.evaluator.state


def test_the_underflow_check_has_power(monkeypatch):
    """With the check disabled the same evaluation is wrong: the test above would fail."""
    ops, _, want = _far_apart()
    monkeypatch.setattr(evaluate.program, "underflow_threshold", lambda dtype: -math.inf)  # nothing ever trips
    got = tmcgraph.log_einsum(_EQ, *ops)
    assert not torch.allclose(got.double(), want, rtol=1e-3, atol=0)


def test_underflow_under_autograd_gives_the_exact_gradient():
    ops, ops64, _ = _far_apart()
    ops = [o.requires_grad_() for o in ops]
    ops64 = [o.requires_grad_() for o in ops64]
    weights = torch.randn(2, 2, 3, dtype=torch.float64)
    got = torch.autograd.grad(tmcgraph.log_einsum(_EQ, *ops), ops, weights.float())
    want = torch.autograd.grad(torch.einsum(_EQ, *[o.exp() for o in ops64]).log(), ops64, weights)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)


def test_structural_zeros_are_exact_with_zero_gradient():
    for seed in range(6):
        g = random_factor_graph(seed, structure="random", plates=seed % 2 == 0)
        f = random_factors(g, seed=seed, neg_inf_prob=0.5, requires_grad=True)
        plan = g.compile()
        for _ in range(2):  # tripped, then sticky
            got = plan.log_sum(f)
            want = brute_force_log_sum(g, f)
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            torch.testing.assert_close(got, want)
            grads = torch.autograd.grad(got, list(f.values()))
            for t, gr in zip(f.values(), grads):
                assert torch.isfinite(gr).all() and (gr[torch.isinf(t.detach())] == 0).all()


def test_backward_twice_with_retain_graph_and_second_derivatives():
    g = random_factor_graph(3, structure="random", plates=True)
    f = random_factors(g, seed=3, batch_shape=(2,), requires_grad=True)
    out = g.compile().log_sum(f).sum()
    first = torch.autograd.grad(out, list(f.values()), retain_graph=True)
    second = torch.autograd.grad(out, list(f.values()))
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    small = tmcgraph.FactorGraph().index("a", 3).index("b", 4).index("c", 2)
    small.factor("ab", ["a", "b"]).factor("bc", ["b", "c"]).factor("c", ["c"])
    plan = small.compile()
    names = list(small.factors)
    inputs = [torch.randn(small.factor_shape(n), dtype=torch.float64, requires_grad=True) for n in names]
    assert torch.autograd.gradgradcheck(lambda *xs: plan.log_sum(dict(zip(names, xs))), inputs)


def test_the_whole_plan_function_is_used_under_autograd():
    g = random_factor_graph(1, structure="chain", num_indices=5)
    f = random_factors(g, seed=1, requires_grad=True)
    out = g.compile().log_sum(f)
    names = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack += [n for n, _ in fn.next_functions]
    assert "_PlanFunctionBackward" in names and "PairFunctionBackward" not in names


@pytest.mark.parametrize("structure", list(STRUCTURES) + ["plated"])
@pytest.mark.parametrize("seed", range(4))
def test_repeated_backward_accumulates_each_leaf_once(structure, seed):
    """Three ``backward()`` calls leave ``3 x`` brute force's gradient in every ``.grad``, and no two
    ``.grad`` share storage (a broadcast or plate sum hands one gradient to both its operands)."""
    plates = structure == "plated"
    g = random_factor_graph(seed, structure="random" if plates else structure, plates=plates)
    f = random_factors(g, seed=seed, batch_shape=[(), (2,)][seed % 2], scale=2.0, requires_grad=True)
    plan = g.compile()
    for _ in range(3):
        plan.log_sum(f).sum().backward()
    want = torch.autograd.grad(brute_force_log_sum(g, f).sum(), list(f.values()))
    for (name, x), w in zip(f.items(), want):
        torch.testing.assert_close(x.grad, 3 * w, rtol=1e-9, atol=1e-10, msg=name)
    ptrs = [x.grad.untyped_storage().data_ptr() for x in f.values()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("equation", ["i,i,i->", "ij,j,j->i", "i,i->i", "i,j->ij"])
def test_log_einsum_repeated_backward_and_clipping(equation):
    """``a[i], b[i], c[i]``: two backward passes give each leaf twice its gradient, so clipping sees the
    true norm."""
    gen = torch.Generator().manual_seed(1)
    ins = equation.split("->")[0].split(",")
    ops = [torch.randn([3] * len(lab), generator=gen, dtype=torch.float64, requires_grad=True) for lab in ins]
    for _ in range(2):
        tmcgraph.log_einsum(equation, *ops).sum().backward()
    want = torch.autograd.grad(torch.einsum(equation, *[x.exp() for x in ops]).log().sum(), ops)
    for x, w in zip(ops, want):
        torch.testing.assert_close(x.grad, 2 * w)
    norm = torch.nn.utils.clip_grad_norm_(ops, max_norm=1e-3)
    torch.testing.assert_close(norm, 2 * torch.linalg.vector_norm(torch.cat([w.flatten() for w in want])))
    for x, w in zip(ops, want):  # every leaf scaled by the same factor
        torch.testing.assert_close(x.grad, 2 * w * (1e-3 / norm), rtol=1e-5, atol=1e-12)


def test_plans_are_immutable():
    plan = random_factor_graph(0, structure="random").compile()
    with pytest.raises(AttributeError, match="Plan is immutable"):
        plan.treewidth = 3
    with pytest.raises(AttributeError, match="Plan is immutable"):
        del plan.stages


def test_a_registered_backend_serves_plans_and_estimators():
    from torch.distributions import Normal

    calls = []

    def counting(plan, tensors, *, state, plate_reduce):
        calls.append(len(tensors))
        return evaluate.BACKENDS["eager"](plan, tensors, state=state, plate_reduce=plate_reduce)

    g = random_factor_graph(1, structure="random")
    f = random_factors(g, seed=1)
    evaluate.register_backend("counting", counting)
    try:
        torch.testing.assert_close(g.compile().log_sum(f, backend="counting"), brute_force_log_sum(g, f))
        m = tmcgraph.Model()
        m.latent("z", prior=lambda: Normal(0.0, 1.0))
        m.observe("x", lambda z: Normal(z, 1.0))
        est = m.compile(K=4, backend="counting")
        assert torch.isfinite(est.log_marginal({"x": torch.tensor(0.5)}))
        assert len(calls) == 2
    finally:
        del evaluate.BACKENDS["counting"]
    with pytest.raises(tmcgraph.TMCError, match=r"unknown backend='counting'; expected one of \['eager', 'compiled'\]"):
        g.compile().log_sum(f, backend="counting")
