"""Chains contracted by a parallel scan (ScanStage) against brute force and the forward algorithm."""

import math

import pytest
import torch
from torch.distributions import Categorical, Normal

import tmcgraph
from tmcgraph.compile import find_chains
from tmcgraph.stages import ScanStage
from tmcgraph.testing import brute_force_log_sum


def chain_graph(n, k, *, seed=0, plate=None, unary=True):
    """n indices of size k, pairwise factors in random orientation, unary factors on some indices."""
    gen = torch.Generator().manual_seed(seed)
    g = tmcgraph.FactorGraph()
    plates = []
    if plate:
        g.plate("N", plate)
        plates = ["N"]
    for i in range(n):
        g.index(f"z{i}", k, plates=plates)
    for i in range(1, n):
        pair = [f"z{i - 1}", f"z{i}"]
        if torch.rand((), generator=gen) < 0.5:
            pair.reverse()
        g.factor(f"f{i}", pair, plates=plates)
        if unary and torch.rand((), generator=gen) < 0.6:
            g.factor(f"u{i}", [f"z{i}"], plates=plates)
    g.factor("u0", ["z0"], plates=plates)
    return g


def factors(g, *, batch=(), seed=0, scale=2.0, neg_inf=0.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in g.factors:
        t = scale * torch.randn(batch + g.factor_shape(name), generator=gen, dtype=torch.float64)
        if neg_inf:
            t[torch.rand(t.shape, generator=gen, dtype=torch.float64) < neg_inf] = -math.inf
        out[name] = t.requires_grad_(requires_grad)
    return out


@pytest.mark.parametrize("n,k,batch,plate", [(6, 3, (), None), (9, 2, (2,), None), (7, 3, (2, 1), None),
                                             (5, 2, (), 3), (6, 2, (2,), 2)])
def test_scanned_chains_match_brute_force_with_gradients(n, k, batch, plate):
    g = chain_graph(n, k, seed=n, plate=plate)
    plan = g.compile(scan="always")
    assert any(isinstance(s, ScanStage) for s in plan.stages)
    f = factors(g, batch=batch, seed=n, requires_grad=True)
    got = plan.log_sum(f)
    want = brute_force_log_sum(g, f)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn(got.shape, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(got, list(f.values()), weights),
                    torch.autograd.grad(want, list(f.values()), weights)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_structural_zeros_and_underflow_in_a_scan():
    g = chain_graph(9, 3, seed=3)
    plan = g.compile(scan="always")
    f = factors(g, seed=3, neg_inf=0.3, requires_grad=True)
    got, want = plan.log_sum(f), brute_force_log_sum(g, f)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want)
    for t, gr in zip(f.values(), torch.autograd.grad(got, list(f.values()))):
        assert torch.isfinite(gr).all() and (gr[torch.isinf(t.detach())] == 0).all()
    # float32 factors of magnitude ~1e3: maxima far apart in every link, still within 1e-4 of float64
    f64 = factors(g, seed=4, scale=1000.0)
    got32 = plan.log_sum({n: t.float() for n, t in f64.items()})
    assert abs(got32.double() - brute_force_log_sum(g, f64)) <= 1e-4 * abs(brute_force_log_sum(g, f64))


def forward_algorithm(log_init, log_trans, log_emit):
    """HMM log-likelihood by the forward recursion (float64): log_trans (T-1, K, K), log_emit (T, K)."""
    alpha = log_init + log_emit[0]
    for t in range(1, log_emit.shape[0]):
        alpha = (alpha[:, None] + log_trans[t - 1]).logsumexp(0) + log_emit[t]
    return alpha.logsumexp(0)


def test_enumerated_hmm_equals_the_forward_algorithm():
    """An HMM declared as a model with enumerated states, scanned, against the forward algorithm."""
    torch.manual_seed(0)
    T, K = 12, 4
    init = torch.softmax(torch.randn(K, dtype=torch.float64), 0)
    trans = torch.softmax(torch.randn(K, K, dtype=torch.float64), -1)
    trans[0, 1] = 0.0  # a structural zero
    trans = trans / trans.sum(-1, keepdim=True)
    means = torch.linspace(-2, 2, K, dtype=torch.float64)
    x = torch.randn(T, dtype=torch.float64)
    m = tmcgraph.Model()
    m.latent("z0", prior=lambda: Categorical(init), enumerate=True)
    for t in range(1, T):
        m.latent(f"z{t}", prior=lambda prev: Categorical(trans[prev]), parents=[f"z{t - 1}"], enumerate=True)
    for t in range(T):
        m.observe(f"x{t}", lambda z: Normal(means[z], 1.0), parents=[f"z{t}"])
    est = m.compile(scan="always")
    data = {f"x{t}": x[t] for t in range(T)}
    got = est.log_marginal(data)
    assert any(isinstance(s, ScanStage) for s in est.plan.stages)
    log_emit = Normal(means, 1.0).log_prob(x[:, None])
    want = forward_algorithm(init.log(), trans.log().expand(T - 1, K, K), log_emit)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.compile(scan="never").log_marginal(data), want, rtol=1e-10, atol=1e-10)


def test_log_einsum_chains_and_the_compiled_backend():
    ops = [torch.randn(3, 3, dtype=torch.float64) for _ in range(20)]
    letters = "abcdefghijklmnopqrstu"
    eq = ",".join(letters[i] + letters[i + 1] for i in range(20)) + "->au"
    plan = tmcgraph.log_einsum_plan(eq, *[o.shape for o in ops])
    assert isinstance(plan.stages[0], ScanStage)  # "auto": K = 3 is dispatch-bound
    want = torch.einsum(eq, *[o.exp() for o in ops]).log()
    torch.testing.assert_close(tmcgraph.log_einsum(eq, *ops), want)
    g = chain_graph(8, 3, seed=8)
    f = factors(g, seed=8)
    plan = g.compile(scan="always")
    torch.testing.assert_close(plan.log_sum(f, backend="compiled"), brute_force_log_sum(g, f))


def test_auto_scans_small_k_and_not_large_k():
    assert any(isinstance(s, ScanStage) for s in chain_graph(20, 4, seed=1).compile().stages)
    assert not any(isinstance(s, ScanStage) for s in chain_graph(20, 128, seed=1, unary=False).compile().stages)
    assert not any(isinstance(s, ScanStage) for s in chain_graph(20, 4, seed=1).compile(scan="never").stages)
    with pytest.raises(tmcgraph.TMCError, match="unknown scan='sometimes'"):
        chain_graph(3, 2).compile(scan="sometimes")


def test_find_chains_reads_links_and_unary_terms():
    terms = ["ab", "cb", "cd", "b", "c", "de", "exy"]  # e is also in a term of three summed labels
    chains = find_chains(terms, "", {c: 3 for c in "abcdexy"})
    assert len(chains) == 1
    order, chain, unary, batch = chains[0]
    assert chain in ("abcde", "edcba") and sorted(order) == [0, 1, 2, 5] and batch == ""
    assert sorted(p for p, _ in unary) == [3, 4]
    assert find_chains(["ab", "bc", "ca"], "", {c: 2 for c in "abc"}) == []  # a cycle: no ends
