"""Plate-sharded TMC on torch.distributed: 2-process gloo groups on localhost against single-process results."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import Bernoulli, Normal

from tmcgraph import Model, TMCError
from tmcgraph.distributed import Shard, all_reduce_grads

SEED = 1234
SIZES = (4, 3)  # unequal shards of N = 7
B = 2  # a batch of datasets


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, sum(SIZES), generator=g, dtype=torch.float64) + 1.0


def _sampled_model(n):
    """mu -> z_n -> x_n, both latents sampled (the shards' z are independent draws)."""
    m = Model()
    m.plate("N", n)
    m.latent("mu", prior=lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 1.0),
             proposal=lambda: Normal(torch.tensor(0.3, dtype=torch.float64), 1.2))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.1), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    return m


def _mixed_model(n, params):
    """A sampled global mu with a learned proposal, enumerated local c_n: no per-shard randomness, so a
    single process drawing mu from the same stream reproduces every number."""
    a, log_s, w = params
    m = Model()
    m.plate("N", n)
    m.latent("mu", prior=lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 2.0),
             proposal=lambda: Normal(a, log_s.exp()))
    m.latent("c", prior=lambda: Bernoulli(logits=w), enumerate=True, plates=["N"])
    m.observe("x", lambda mu, c: Normal(mu + 2.0 * c - 1.0, 0.7), plates=["N"])
    return m


def _nested_model(n, m_size, params):
    """mu (sampled) -> c_n (enumerated, plate N) -> x_{n,m} (plates N, M): nested plates."""
    a, log_s, w = params
    m = Model()
    m.plate("N", n)
    m.plate("M", m_size)
    m.latent("mu", prior=lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 2.0),
             proposal=lambda: Normal(a, log_s.exp()))
    m.latent("c", prior=lambda: Bernoulli(logits=w), enumerate=True, plates=["N"])
    m.observe("x", lambda mu, c: Normal(mu + 2.0 * c - 1.0, 0.7), plates=["N", "M"])  # c: (..., N, 1)
    return m


NESTED = (3, 5)  # N, M of the nested model: shard N (outer) as (2, 1), or M (inner) as (3, 2)


def _nested_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, *NESTED, generator=g, dtype=torch.float64)


def _params():
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.4, -0.2, 0.3)]


def _shard_of(x, rank):
    start = sum(SIZES[:rank])
    return x[..., start:start + SIZES[rank]]


def _worker(rank, world, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        x = _data()
        xs = _shard_of(x, rank)

        # 1. sampled local latents: the sharded value and its factor gradients against the single-process
        #    plan evaluated on the same factors, concatenated along the plate
        est = _sampled_model(SIZES[rank]).compile(K=5, shard=Shard("N", seed=SEED))
        tr, plan, norm = est._trace({"x": xs})
        leaves = {n: f.detach().requires_grad_() for n, f in tr.factors.items()}
        value = est._log_sum(plan, leaves, share=True) - norm
        value.sum().backward()
        out["sampled"] = {"value": value.detach(), "factors": {n: f.detach() for n, f in leaves.items()},
                          "grads": {n: f.grad for n, f in leaves.items()}, "mu": tr.values["mu"].detach(),
                          "z": tr.values["z"].detach(), "norm": norm}
        # log_marginal runs the same path end to end
        out["sampled"]["log_marginal"] = est.log_marginal({"x": xs}).detach()

        # 2. exact parameter gradients on the mixed model (replicated params summed over the processes)
        params = _params()
        est = _mixed_model(SIZES[rank], params).compile(K=6, shard=Shard("N", seed=SEED))
        lm = est.log_marginal({"x": xs})
        lm.sum().backward()
        all_reduce_grads(params)
        out["mixed"] = {"value": lm.detach(), "grads": [p.grad.clone() for p in params]}
        # posterior marginals of the global latent, and of this shard's local latent
        post = _mixed_model(SIZES[rank], _params()).compile(K=6, shard=Shard("N", seed=SEED)).posterior({"x": xs})
        out["mixed"]["mu_marginal"] = post.marginals["mu"]
        out["mixed"]["c_marginal"] = post.marginals["c"]
        # DReGs surrogate: gradient shares summed over the processes
        params = _params()
        est = _mixed_model(SIZES[rank], params).compile(K=6, shard=Shard("N", seed=SEED))
        sur = est.dregs_surrogate({"x": xs})
        sur.sum().backward()
        all_reduce_grads(params)
        out["mixed"]["dregs_value"] = sur.detach()
        out["mixed"]["dregs_grads"] = [None if p.grad is None else p.grad.clone() for p in params]

        # nested plates: shard the outer plate N, then the inner plate M
        xn = _nested_data()
        for plate, dim, split in (("N", -2, (2, 1)), ("M", -1, (3, 2))):
            start = sum(split[:rank])
            part = xn.narrow(dim, start, split[rank])
            sizes = (part.shape[-2], part.shape[-1])
            params = _params()
            est = _nested_model(*sizes, params).compile(K=4, shard=Shard(plate, seed=SEED))
            lm = est.log_marginal({"x": part})
            lm.sum().backward()
            all_reduce_grads(params)
            out[f"nested_{plate}"] = {"value": lm.detach(), "grads": [p.grad.clone() for p in params]}

        # 3. seeds: without a seed, rank 0's is broadcast; the shared stream agrees, torch's state is untouched
        s = Shard("N")
        out["seed"] = s.seed  # rank 0 draws it from torch's generator and broadcasts it
        before = torch.get_rng_state()
        with s.stream(shared=True):
            out["shared_draw"] = torch.rand(3)
        with s.stream(shared=False):
            out["local_draw"] = torch.rand(3)
        out["rng_untouched"] = torch.equal(before, torch.get_rng_state())
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            torch.save(gathered, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    out = str(d / "out.pt")
    mp.spawn(_worker, args=(len(SIZES), str(d / "init"), out), nprocs=len(SIZES), join=True)
    return torch.load(out, weights_only=False)


def _single_mixed(x, seed_state=True):
    """The single-process mixed model on the whole data, mu drawn from the shared stream's start."""
    params = _params()
    est = _mixed_model(sum(SIZES), params).compile(K=6)
    state = torch.get_rng_state()
    torch.set_rng_state(torch.Generator().manual_seed(SEED).get_state())
    try:
        lm = est.log_marginal({"x": x})
        lm.sum().backward()
        grads = [p.grad.clone() for p in params]
        torch.set_rng_state(torch.Generator().manual_seed(SEED).get_state())
        post = _mixed_model(sum(SIZES), _params()).compile(K=6).posterior({"x": x})
        params2 = _params()
        torch.set_rng_state(torch.Generator().manual_seed(SEED).get_state())
        sur = _mixed_model(sum(SIZES), params2).compile(K=6).dregs_surrogate({"x": x})
        sur.sum().backward()
    finally:
        torch.set_rng_state(state)
    return lm.detach(), grads, post, sur.detach(), [None if p.grad is None else p.grad.clone() for p in params2]


@pytest.mark.slow
def test_sharded_sampled_model_equals_single_process_on_the_same_factors(results):
    r0, r1 = (r["sampled"] for r in results)
    # the global latent's samples agree across processes; the shards' local samples are independent draws
    assert torch.equal(r0["mu"], r1["mu"])
    assert not torch.equal(r0["z"][..., :3, :], r1["z"][..., :3, :])
    x = _data()
    est = _sampled_model(sum(SIZES)).compile(K=5)
    plan = est.plan
    factors, plate_dim = {}, 1  # factors are (B, [N,] K...) : N right after the batch dim
    for n, f0 in r0["factors"].items():
        if f0.dim() > 1 and n in ("z", "x"):
            factors[n] = torch.cat([f0, r1["factors"][n]], dim=plate_dim).requires_grad_()
        else:
            assert torch.equal(f0, r1["factors"][n])  # replicated factors are identical
            factors[n] = f0.clone().requires_grad_()
    _, _, norm = est._trace({"x": x})
    single = plan.log_sum(factors) - norm
    single.sum().backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["value"], single.detach(), rtol=0, atol=1e-12)
    # log_marginal (a fresh draw) gives every process the same value
    assert torch.isfinite(r0["log_marginal"]).all() and torch.equal(r0["log_marginal"], r1["log_marginal"])
    for n, f in factors.items():
        if n in ("z", "x"):
            torch.testing.assert_close(torch.cat([r0["grads"][n], r1["grads"][n]], dim=plate_dim), f.grad)
        else:  # replicated: the per-process shares sum to the gradient
            torch.testing.assert_close(r0["grads"][n] + r1["grads"][n], f.grad)
    # the log-normaliser counts every shard's copies of z once
    assert r0["norm"] == pytest.approx(math.log(5) * (1 + sum(SIZES)))


@pytest.mark.slow
def test_sharded_parameter_gradients_posterior_and_dregs_equal_single_process(results):
    lm, grads, post, sur, sur_grads = _single_mixed(_data())
    for rank, r in enumerate(results):
        m = r["mixed"]
        torch.testing.assert_close(m["value"], lm, rtol=0, atol=1e-12)
        for g, want in zip(m["grads"], grads):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m["mu_marginal"], post.marginals["mu"])
        torch.testing.assert_close(m["c_marginal"], _shard_of(post.marginals["c"].transpose(-1, -2), rank)
                                   .transpose(-1, -2))
        torch.testing.assert_close(m["dregs_value"], sur)
        assert sur_grads[0] is not None and sur_grads[2] is None  # proposal parameters only
        for g, want in zip(m["dregs_grads"], sur_grads):
            if want is None:
                assert g is None
            else:
                torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("plate", ["N", "M"])
def test_sharded_nested_plates_equal_single_process(results, plate):
    params = _params()
    est = _nested_model(*NESTED, params).compile(K=4)
    state = torch.get_rng_state()
    torch.set_rng_state(torch.Generator().manual_seed(SEED).get_state())
    try:
        lm = est.log_marginal({"x": _nested_data()})
    finally:
        torch.set_rng_state(state)
    lm.sum().backward()
    for r in results:
        got = r[f"nested_{plate}"]
        torch.testing.assert_close(got["value"], lm.detach(), rtol=0, atol=1e-12)
        for g, p in zip(got["grads"], params):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_sharded_streams(results):
    r0, r1 = results
    assert r0["seed"] == r1["seed"]
    assert torch.equal(r0["shared_draw"], r1["shared_draw"])  # the broadcast seed agrees
    assert not torch.equal(r0["local_draw"], r1["local_draw"])
    assert r0["rng_untouched"] and r1["rng_untouched"]


def test_unshardable_structures_are_refused():
    m = Model()
    m.plate("N", 3)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda x: Normal(x.mean(-1), 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"latent 'mu' is outside the sharded plate 'N', but its proposal reads"):
        m.compile(K=4, shard=Shard("N"))
    with pytest.raises(TMCError, match=r"plate 'M' is not declared"):
        _sampled_model(3).compile(K=4, shard=Shard("M"))
    with pytest.raises(TMCError, match="eager backend"):
        _sampled_model(3).compile(K=4, shard=Shard("N"), backend="compiled")
    if not (dist.is_available() and dist.is_initialized()):
        est = _sampled_model(3).compile(K=4, shard=Shard("N"))
        with pytest.raises(TMCError, match="initialised torch.distributed process group"):
            est.log_marginal({"x": torch.zeros(3)})


def test_plate_reduce_hook_sees_each_plate_product_once():
    """The hook a sharded evaluation all-reduces with: called once per product over the plate, with the
    full batch shape; the identity hook leaves the result unchanged."""
    est = _sampled_model(4).compile(K=3)
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    tr, plan, _ = est._trace({"x": x})
    seen = []

    def hook(t):
        seen.append(tuple(t.shape))
        return t

    a = plan.log_sum(tr.factors, plate_reduce=("N", hook))
    torch.testing.assert_close(a, plan.log_sum(tr.factors))
    assert seen == [(2, 3)]  # (batch, K of mu): the plate product over N of the z-x block
    with pytest.raises(TMCError, match="plate 'Q' is not in this plan"):
        plan.log_sum(tr.factors, plate_reduce=("Q", hook))




@pytest.mark.slow
def test_torchrun_example_agrees_with_one_process():
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           os.path.join(root, "examples", "distributed_tmc.py"), "--json", "--points", "101", "--K", "8",
           "--train", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines()
                                            if "rank" in line.lower() or "error" in line.lower())[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shard_sizes"] == [51, 50] and out["processes"] == 2
    assert out["log_marginal"] == pytest.approx(out["single_process"], rel=1e-12)
    assert out["max_grad_diff"] < 1e-9 and out["train"]["max_param_diff"] < 1e-9
