"""log_einsum: log domain against exp domain, numerics, gradients, errors."""

import math

import pytest
import torch

import tmcgraph
from tmcgraph import log_einsum
from tmcgraph.evaluate.kernels import log_contract_pair


def _randn(*shape, scale=1.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape) * 7 + len(shape))
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    ("ab,bc,cd,da->", [(2, 3), (3, 4), (4, 2), (2, 2)]),
    ("abc,bcd,d->ad", [(2, 3, 4), (3, 4, 5), (5,)]),
    ("i,i->i", [(4,), (4,)]),
    ("ij->", [(3, 4)]),
    ("ij->ji", [(3, 4)]),
    ("ii->i", [(3, 3)]),
    ("iij,j->i", [(3, 3, 2), (2,)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)]),
    ("...ij,...jk->ik", [(2, 3, 4), (2, 4, 5)]),
    ("b...i,i->b...", [(2, 3, 4, 5), (5,)]),
    ("ij,kl->ijkl", [(2, 3), (4, 1)]),
    ("ij,jk->ik", [(3, 1), (4, 5)]),  # size-1 broadcast of a contracted label
    ("ab,ac,ad,bc,bd,cd->", [(3, 3), (3, 3), (3, 3), (3, 3), (3, 3), (3, 3)]),
]


@pytest.mark.parametrize("equation,shapes", EQUATIONS)
@pytest.mark.parametrize("optimize", ["auto", "tree", "greedy", "dp", "optimal"])
def test_matches_exp_domain(equation, shapes, optimize):
    ops = [_randn(*s, seed=k) for k, s in enumerate(shapes)]
    got = log_einsum(equation, *ops, optimize=optimize)
    want = torch.einsum(equation, *[o.exp() for o in ops]).log()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_many_operands_and_memory_limit():
    ops = [_randn(4, 4, seed=k) for k in range(8)]
    eq = "ab,bc,cd,de,ef,fg,gh,ha->"
    want = torch.einsum(eq, *[o.exp() for o in ops]).log()
    torch.testing.assert_close(log_einsum(eq, *ops), want)
    plan = tmcgraph.log_einsum_plan(eq, *[o.shape for o in ops], memory_limit=4)
    assert plan.largest_intermediate <= 4
    torch.testing.assert_close(log_einsum(eq, *ops, memory_limit=4), want)
    # kept labels are chunked and concatenated
    a, b = _randn(6, 5), _randn(5, 7)
    torch.testing.assert_close(log_einsum("ij,jk->ik", a, b, memory_limit=5), log_einsum("ij,jk->ik", a, b))


def test_neg_inf_results_and_gradients():
    a = _randn(4, 5, seed=1)
    b = _randn(5, 3, seed=2)
    a[0] = -math.inf  # row 0: every term zero
    a[1, :3] = -math.inf
    b[3:, 1] = -math.inf  # (1, 1): every term zero through disjoint supports
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = log_einsum("ij,jk->ik", a, b)
    brute = (a[:, :, None] + b[None]).logsumexp(1)
    assert torch.equal(torch.isinf(out), torch.isinf(brute))
    assert torch.isinf(out[0]).all() and out[1, 1] == -math.inf
    torch.testing.assert_close(out[torch.isfinite(out)], brute[torch.isfinite(brute)])
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert (a.grad[torch.isinf(a.detach())] == 0).all()
    assert (b.grad[torch.isinf(b.detach())] == 0).all()


def test_gradients_are_responsibilities():
    a = _randn(3, 4, seed=3).requires_grad_(True)
    b = _randn(4, 5, seed=4).requires_grad_(True)
    c = _randn(5, seed=5).requires_grad_(True)
    weights = _randn(3, seed=6)
    (log_einsum("ij,jk,k->i", a, b, c) * weights).sum().backward()
    joint = a[:, :, None] + b[None] + c  # (i, j, k)
    resp = torch.softmax(joint.detach().reshape(3, -1), -1).reshape(3, 4, 5) * weights[:, None, None]
    torch.testing.assert_close(a.grad, resp.sum(2))
    torch.testing.assert_close(b.grad, resp.sum(0))
    torch.testing.assert_close(c.grad, resp.sum((0, 1)))


def test_underflow_is_repaired():
    """Per-operand maxima at different contracted positions, far apart: the
    fast path's sum underflows to 0 in float32; the repair recovers it."""
    for dtype, gap in [(torch.float32, 200.0), (torch.float64, 2000.0)]:
        a = torch.tensor([[0.0, -gap], [0.0, 0.0]], dtype=dtype)
        b = torch.tensor([[-gap, 0.0], [0.0, 0.0]], dtype=dtype)
        got = log_einsum("ij,jk->ik", a, b)
        want = (a.double()[:, :, None] + b.double()[None]).logsumexp(1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
        # and so does the gradient: d/da[0, :] of out[0, 0] is (1/2, 1/2)
        a.requires_grad_(True)
        log_einsum("ij,jk->ik", a, b)[0, 0].backward()
        torch.testing.assert_close(a.grad[0].double(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_repair_kernel_directly_with_batch_and_kept_labels():
    a = _randn(2, 3, 4, 5, scale=300.0, seed=7)  # (batch, h, i, j)
    b = _randn(1, 3, 5, 6, scale=300.0, seed=8)  # (batch, h, j, k)
    got = log_contract_pair(a.float(), "hij", b.float(), "hjk", "hik")
    want = (a[..., :, :, None] + b[..., None, :, :]).logsumexp(-2)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def _chain(n, k, scale, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ops = [scale * torch.randn(k, generator=gen, dtype=torch.float64)]
    ops += [scale * torch.randn(k, k, generator=gen, dtype=torch.float64) for _ in range(n - 1)]
    letters = [tmcgraph.paths.opt_einsum.get_symbol(i) for i in range(n)]
    eq = ",".join([letters[0]] + [letters[i - 1] + letters[i] for i in range(1, n)]) + "->"
    return eq, [o.to(dtype) for o in ops], ops


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_float32_chain_with_extreme_log_factors(scale):
    """20-chain, K=64, log-factor std 100 (and 1e4) in float32 agrees with float64 to 1e-4."""
    eq, ops32, ops64 = _chain(20, 64, scale, torch.float32)
    got = log_einsum(eq, *ops32)
    want = log_einsum(eq, *ops64)
    msg = ops64[0]
    for f in ops64[1:]:
        msg = (msg[:, None] + f).logsumexp(0)
    torch.testing.assert_close(want, msg.logsumexp(0))
    assert torch.isfinite(got)
    assert abs(got.double().item() - want.item()) <= 1e-4 * abs(want.item())


def test_float32_extreme_gradients_are_finite():
    eq, ops32, ops64 = _chain(8, 16, 100.0, torch.float32, seed=1)
    for o in ops32 + ops64:
        o.requires_grad_(True)
    log_einsum(eq, *ops32).backward()
    log_einsum(eq, *ops64).backward()
    for o32, o64 in zip(ops32, ops64):
        assert torch.isfinite(o32.grad).all()
        torch.testing.assert_close(o32.grad.double(), o64.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: log_einsum("ij,jk", _randn(2, 3), _randn(3, 4)), "explicit '->'"),
        (lambda: log_einsum("ij,jk->ik", _randn(2, 3)), "2 operand terms but 1 tensors"),
        (lambda: log_einsum("ij,jk->ik", _randn(2, 3), _randn(4, 4)), "label 'j' has size 4 but operand 0 has size 3"),
        (lambda: log_einsum("ijk,jk->i", _randn(2, 3), _randn(3, 4)), "operand 0: term 'ijk' has 3 labels"),
        (lambda: log_einsum("ij,jk->iz", _randn(2, 3), _randn(3, 4)), "output label 'z'"),
        (lambda: log_einsum("ij,jk->ii", _randn(2, 3), _randn(3, 4)), "appears twice"),
        (lambda: log_einsum("i1,jk->i", _randn(2, 3), _randn(3, 4)), "labels must be ASCII letters"),
        (lambda: log_einsum("ij->i", _randn(2, 3), optimize="fastest"), "unknown optimize='fastest'"),
        (lambda: log_einsum("ij->i", _randn(2, 3), memory_limit=0), "memory_limit"),
        (lambda: log_einsum("ij->i", torch.ones(2, 3, dtype=torch.long)), "floating-point"),
        (lambda: log_einsum("ij->i", torch.tensor([[0.0, math.nan]])), "operand '0' contains NaN"),
        (lambda: log_einsum("ij->i", [[1.0]]), "expected a torch.Tensor"),
    ],
)
def test_errors_name_the_problem(call, match):
    with pytest.raises(tmcgraph.TMCError, match=match):
        call()


def test_errors_are_value_errors():
    assert issubclass(tmcgraph.TMCError, ValueError)


@pytest.mark.parametrize("case", ["plain", "batch_on_one_side", "summed_on_one_side", "broadcast_label", "neg_inf",
                                  "repaired", "one_requires_grad"])
def test_pair_backward_equals_the_plain_autograd_path(case):
    """The custom backward of a pairwise step (softmax-weighted contraction of the saved exponentials)
    equals autograd through the plain fast path and its repair."""
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    a, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    la, lb, out, dtype = "ij", "jk", "ik", torch.float64
    if case == "batch_on_one_side":
        a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    elif case == "summed_on_one_side":
        out = "k"
    elif case == "broadcast_label":
        a = a[:, :1]
    elif case == "neg_inf":
        a[0] = -math.inf
        a[1, 2] = -math.inf
        b[:, 1] = -math.inf
    elif case == "repaired":
        a, b, dtype = a * 1000, b * 1000, torch.float32
    a, b = a.to(dtype), b.to(dtype)
    a.requires_grad_()
    b.requires_grad_(case != "one_requires_grad")
    result = log_contract_pair(a, la, b, lb, out)
    # a size-1 label against a larger one is a one-sided sum: reduced exactly, no pairwise step
    assert ("PairFunctionBackward" in _grad_fns(result)) == (case != "broadcast_label")
    weights = torch.randn(result.shape, generator=g, dtype=torch.float64).to(dtype)
    wanted = [x for x in (a, b) if x.requires_grad]
    got = torch.autograd.grad(result, wanted, weights)
    leaves = [x.detach().requires_grad_(x.requires_grad) for x in (a, b)]
    plain = log_contract_pair(leaves[0], la, leaves[1], lb, out, custom_backward=False)
    assert "PairFunctionBackward" not in _grad_fns(plain)
    want = torch.autograd.grad(plain, [x for x in leaves if x.requires_grad], weights)
    assert torch.equal(result, plain)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def _grad_fns(out):
    names, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack += [n for n, _ in fn.next_functions]
    return names


def test_pair_second_derivatives():
    from tmcgraph.evaluate.kernels import log_contract_pair

    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, y: log_contract_pair(x, "ij", y, "jk", "ik"), (a, b))
