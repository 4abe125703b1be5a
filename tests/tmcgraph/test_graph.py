"""FactorGraph plans against the brute-force unrolling oracle (float64)."""

import math

import pytest
import torch

import tmcgraph
from tmcgraph.testing import STRUCTURES, brute_force_log_sum, random_factor_graph, random_factors

CASES = [(s, False) for s in STRUCTURES] + [("random", True)]


@pytest.mark.parametrize("structure,plates", CASES)
@pytest.mark.parametrize("seed", range(25))
def test_random_graphs_match_brute_force(structure, plates, seed):
    g = random_factor_graph(seed, structure=structure, plates=plates)
    batch = [(), (2,), (3, 1)][seed % 3]
    factors = random_factors(g, seed=seed, batch_shape=batch, scale=2.0)
    got = g.compile().log_sum(factors)
    want = brute_force_log_sum(g, factors)
    assert got.shape == want.shape == batch
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("optimize", tmcgraph.OPTIMIZERS)
@pytest.mark.parametrize("seed", range(4))
def test_every_optimizer_matches_brute_force(optimize, seed):
    # small enough for the exhaustive optimizers ("optimal" is exponential in the operands)
    cases = [("loop", False, 3), ("chain", False, 3)]
    if optimize not in ("optimal", "branch-2"):
        cases += [("loop", False, 5), ("chain", False, 6), ("random", True, None)]
    for structure, plates, n in cases:
        g = random_factor_graph(seed, structure=structure, plates=plates, num_indices=n)
        factors = random_factors(g, seed=seed)
        got = g.compile(optimize=optimize).log_sum(factors)
        torch.testing.assert_close(got, brute_force_log_sum(g, factors), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("optimize", ["auto", "tree", "greedy", "cotengra"])
def test_optimizers_on_a_grid(optimize):
    g = random_factor_graph(3, structure="grid", num_indices=16)
    factors = random_factors(g, seed=3)
    got = g.compile(optimize=optimize).log_sum(factors)
    torch.testing.assert_close(got, brute_force_log_sum(g, factors), rtol=1e-10, atol=1e-10)


def test_batch_dims_broadcast_across_factors():
    g = tmcgraph.FactorGraph().plate("N", 3).index("t", 4).index("z", 2, plates=["N"])
    g.factor("prior", ["t"]).factor("lik", ["t", "z"], plates=["N"])
    gen = torch.Generator().manual_seed(0)
    prior = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64)  # batch (5, 1)
    lik = torch.randn(6, 3, 4, 2, generator=gen, dtype=torch.float64)  # batch (6,)
    got = g.compile().log_sum({"prior": prior, "lik": lik})
    assert got.shape == (5, 6)
    for i in range(5):
        for j in range(6):
            want = brute_force_log_sum(g, {"prior": prior[i, 0], "lik": lik[j]})
            torch.testing.assert_close(got[i, j], want)


def test_global_local_model_closed_form():
    """Appendix A, Fig. 6: sum_theta f_theta prod_i sum_z f_i(theta, z)."""
    n, kt, k = 50, 6, 5
    g = tmcgraph.FactorGraph().plate("N", n).index("theta", kt).index("z", k, plates=["N"])
    g.factor("prior", ["theta"]).factor("lik", ["theta", "z"], plates=["N"])
    f = random_factors(g, seed=1)
    want = (f["prior"] + f["lik"].logsumexp(-1).sum(0)).logsumexp(0)
    torch.testing.assert_close(g.compile().log_sum(f), want)


def test_nested_plates_and_extra_factor_plates():
    g = tmcgraph.FactorGraph().plate("A", 2).plate("B", 3)
    g.index("u", 2, plates=["A"]).index("v", 3, plates=["A", "B"]).index("w", 2)
    g.factor("fu", ["w", "u"], plates=["A"])
    g.factor("fv", ["u", "v"], plates=["B", "A"])  # plates listed in another order
    g.factor("obs", ["v"], plates=["A", "B"])
    g.factor("obs_w", ["w"], plates=["B"])  # a factor in a plate its index does not live in
    f = random_factors(g, seed=3, batch_shape=(2,))
    torch.testing.assert_close(g.compile().log_sum(f), brute_force_log_sum(g, f))


def test_untouched_index_contributes_log_k():
    g = tmcgraph.FactorGraph().plate("N", 3).index("a", 4).index("lonely", 5, plates=["N"]).factor("fa", ["a"])
    f = random_factors(g, seed=0)
    got = g.compile().log_sum(f)
    torch.testing.assert_close(got, f["fa"].logsumexp(0) + 3 * math.log(5))
    torch.testing.assert_close(got, brute_force_log_sum(g, f))


def test_plan_is_cached_and_reports_structure():
    def chain(n, k):
        g = tmcgraph.FactorGraph()
        for i in range(n):
            g.index(f"z{i}", k)
        for i in range(1, n):
            g.factor(f"f{i}", [f"z{i - 1}", f"z{i}"])
        return g

    assert chain(6, 4).compile() is chain(6, 4).compile()
    plan = chain(20, 64).compile()
    assert plan.treewidth == 1
    # a chain must cost K^2 per step, never K^3
    assert plan.flops <= 19 * 2 * 64**2
    assert plan.largest_intermediate <= 64
    text = plan.describe()
    assert "tree-width" in text and "naive" in text and "greedy" in text
    assert all(isinstance(step, tuple) for step in plan.path)


def test_treewidth_of_known_graphs():
    assert random_factor_graph(0, structure="loop", num_indices=6).compile().treewidth == 2
    assert random_factor_graph(0, structure="grid", num_indices=9, max_size=1).compile().treewidth == 3
    assert random_factor_graph(0, structure="tree", num_indices=7).compile().treewidth == 1


def test_gradients_match_brute_force():
    g = random_factor_graph(7, plates=True)
    f = random_factors(g, seed=7, batch_shape=(2,), requires_grad=True)
    g.compile().log_sum(f).sum().backward()
    got = {k: v.grad.clone() for k, v in f.items()}
    for v in f.values():
        v.grad = None
    brute_force_log_sum(g, f).sum().backward()
    for k in f:
        torch.testing.assert_close(got[k], f[k].grad)


def test_neg_inf_factors_and_gradients():
    for seed in range(10):
        g = random_factor_graph(seed, plates=seed % 2 == 0)
        f = random_factors(g, seed=seed, neg_inf_prob=0.4, requires_grad=True)
        got = g.compile().log_sum(f)
        want = brute_force_log_sum(g, f)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got, want)
        got.backward()
        for name, t in f.items():
            assert torch.isfinite(t.grad).all(), name
            assert (t.grad[torch.isinf(t.detach())] == 0).all(), name


def test_all_neg_inf_gives_neg_inf_and_zero_gradient():
    g = tmcgraph.FactorGraph().plate("N", 2).index("a", 3).index("z", 2, plates=["N"])
    g.factor("fa", ["a"]).factor("lik", ["a", "z"], plates=["N"])
    fa = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lik = torch.full((2, 3, 2), -math.inf, dtype=torch.float64, requires_grad=True)
    out = g.compile().log_sum({"fa": fa, "lik": lik})
    assert out.item() == -math.inf
    out.backward()
    assert torch.equal(fa.grad, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(lik.grad, torch.zeros_like(lik))


def _grid(side, k):
    g = tmcgraph.FactorGraph()
    at = lambda r, c: f"z{r}_{c}"  # noqa: E731
    for r in range(side):
        for c in range(side):
            g.index(at(r, c), k)
            g.factor(f"u{r}_{c}", [at(r, c)])
            if r:
                g.factor(f"v{r}_{c}", [at(r - 1, c), at(r, c)])
            if c:
                g.factor(f"h{r}_{c}", [at(r, c - 1), at(r, c)])
    return g


@pytest.mark.parametrize("memory_limit", [20, 60])
def test_memory_limit_slicing_keeps_the_value(memory_limit):
    for seed, structure, plates in [(0, "grid", False), (1, "random", True), (2, "loop", False)]:
        g = random_factor_graph(seed, structure=structure, plates=plates, max_size=4)
        f = random_factors(g, seed=seed, batch_shape=(2,), requires_grad=True)
        plan = g.compile(memory_limit=memory_limit)
        got = plan.log_sum(f)
        torch.testing.assert_close(got, brute_force_log_sum(g, f))
        got.sum().backward()  # sliced plans stay differentiable


def test_memory_limit_bounds_the_largest_intermediate():
    g = _grid(4, 6)
    unsliced = g.compile()
    sliced = g.compile(memory_limit=300)
    assert unsliced.largest_intermediate > 300 >= sliced.largest_intermediate
    assert "sliced" in sliced.describe()
    f = random_factors(g, seed=0)
    torch.testing.assert_close(sliced.log_sum(f), unsliced.log_sum(f))


# -- plate scales (subsampled plates) ---------------------------------------------------------------------
def _with_scales(graph, scales):
    """A copy of ``graph`` whose plates carry ``scales`` (plate -> scale)."""
    g = tmcgraph.FactorGraph()
    for p, size in graph.plates.items():
        g.plate(p, size, scale=scales.get(p, 1.0))
    for name, spec in graph.indices.items():
        g.index(name, spec.size, plates=spec.plates)
    for name, spec in graph.factors.items():
        g.factor(name, spec.indices, plates=spec.plates)
    return g


@pytest.mark.parametrize("seed,backend", [(seed, "eager") for seed in range(12)] + [(0, "compiled"), (5, "compiled")])
def test_scaled_plates_equal_the_plate_unrolled_scale_times(seed, backend):
    """An integer plate scale s is the plate unrolled s times over (the oracle enumerates the unrolled copies)."""
    base = random_factor_graph(seed, plates=True, max_size=2)
    scales = {p: float(1 + (seed + k) % 3) for k, p in enumerate(base.plates)}
    g = _with_scales(base, scales)
    f = random_factors(g, seed=seed, batch_shape=[(), (2,)][seed % 2], requires_grad=True)
    plan = g.compile()
    got = plan.log_sum(f, backend=backend)
    want = brute_force_log_sum(g, f)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if any(s != 1 for s in scales.values()) and g.factors:
        assert not torch.allclose(want, brute_force_log_sum(base, f))  # power: the scale changes the value
    for _ in range(2):  # repeated backward
        grads = torch.autograd.grad(got.sum(), list(f.values()), retain_graph=True)
        wants = torch.autograd.grad(want.sum(), list(f.values()), retain_graph=True)
        for name, a, b in zip(f, grads, wants):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_fractional_plate_scale_global_local_closed_form():
    """``log sum_theta exp(f_theta + s * sum_i log sum_z exp f_i(theta, z))`` for a non-integer s."""
    n, kt, k, s = 4, 3, 5, 2.5
    g = tmcgraph.FactorGraph().plate("N", n, scale=s).index("theta", kt).index("z", k, plates=["N"])
    g.index("lonely", 3, plates=["N"])
    g.factor("prior", ["theta"]).factor("lik", ["theta", "z"], plates=["N"])
    f = random_factors(g, seed=4, requires_grad=True)
    want = (f["prior"] + s * f["lik"].logsumexp(-1).sum(0)).logsumexp(0) + s * n * math.log(3)
    plan = g.compile()
    assert "plate-product (scale 2.5)" in plan.describe()
    for backend in ("eager", "compiled"):
        got = plan.log_sum(f, backend=backend)
        torch.testing.assert_close(got, want)
        ga = torch.autograd.grad(got, list(f.values()))
        gb = torch.autograd.grad(want, list(f.values()), retain_graph=True)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


def test_nested_scaled_plates_closed_form():
    """Scales multiply down nested plates: each inner product is scaled by its own plate, then by the outer."""
    a, b, sa, sb = 2, 3, 1.5, 4.0
    g = tmcgraph.FactorGraph().plate("A", a, scale=sa).plate("B", b, scale=sb)
    g.index("u", 2, plates=["A"]).index("v", 3, plates=["A", "B"])
    g.factor("fu", ["u"], plates=["A"]).factor("fv", ["u", "v"], plates=["A", "B"])
    f = random_factors(g, seed=5)
    inner = sb * f["fv"].logsumexp(-1).sum(1)  # (A, u)
    want = sa * (f["fu"] + inner).logsumexp(-1).sum(0)
    torch.testing.assert_close(g.compile().log_sum(f), want)


def test_plate_scale_is_validated_and_part_of_the_structure():
    for bad in (0, -1.0, math.inf, math.nan, True, "2"):
        with pytest.raises(tmcgraph.TMCError, match="plate 'N': scale must be a positive finite number"):
            tmcgraph.FactorGraph().plate("N", 3, scale=bad)

    def graph(scale):
        return tmcgraph.FactorGraph().plate("N", 3, scale=scale).index("z", 2, plates=["N"]).factor(
            "f", ["z"], plates=["N"])

    assert graph(2.0).compile() is not graph(1.0).compile()
    assert graph(2.0).compile() is graph(2.0).compile()
    with pytest.raises(tmcgraph.TMCError, match="plate 'N'.*2.5 is not an integer"):
        brute_force_log_sum(graph(2.5), random_factors(graph(2.5)))


def test_a_sharded_scaled_plate_all_reduces_the_scaled_product():
    """Two identical shards all-reduced (the hook doubles the plate product) equal the plate at twice the scale."""
    def graph(scale):
        g = tmcgraph.FactorGraph().plate("N", 3, scale=scale).index("t", 4).index("z", 2, plates=["N"])
        return g.factor("prior", ["t"]).factor("lik", ["t", "z"], plates=["N"])

    f = random_factors(graph(1.5), seed=2, batch_shape=(2,))
    got = graph(1.5).compile().log_sum(f, plate_reduce=("N", lambda t: 2 * t))
    torch.testing.assert_close(got, graph(3.0).compile().log_sum(f))
    torch.testing.assert_close(got, brute_force_log_sum(graph(3.0), f))
