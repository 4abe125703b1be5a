"""A TMC log marginal and its gradients with plate N sharded across processes, checked against one process.

Run on two CPU processes (gloo)::

    torchrun --nproc-per-node 2 examples/distributed_tmc.py --json

Each process holds a shard of the N data points (unequal shards when N is odd)
and declares the model with its shard's plate size.  The global latent ``mu``
is drawn from a stream every process shares; the per-point assignments ``c_n``
are summed exactly (enumerated), so a single process drawing ``mu`` from the
same stream reproduces every number: rank 0 computes it in the same run and
prints both, with the largest difference between the sharded gradients
(per-process shares of the replicated parameters summed by
``all_reduce_grads``) and the single-process ones.  (Models with sampled local
latents are checked against one process factor by factor in
``tests/tmcgraph/test_distributed.py``.)

Model: ``mu ~ N(0, 2^2)`` with the learned proposal ``N(a, exp(log_s)^2)``,
``c_n ~ Bernoulli(sigmoid(w))``, ``x_n ~ N(mu + 2 c_n - 1, 0.7^2)``.  ``--train STEPS`` trains the
TMC objective data-parallel (sharded plate, gradients summed by ``all_reduce_grads``) and on one
process, and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
from torch.distributions import Bernoulli, Normal

from tmcgraph import Model
from tmcgraph.distributed import Shard, all_reduce_grads


def build(num_points: int, params) -> Model:
    a, log_s, w = params
    m = Model()
    m.plate("N", num_points)
    m.latent("mu", prior=lambda: Normal(torch.tensor(0.0, dtype=torch.float64), 2.0),
             proposal=lambda: Normal(a, log_s.exp()))
    m.latent("c", prior=lambda: Bernoulli(logits=w), enumerate=True, plates=["N"])
    m.observe("x", lambda mu, c: Normal(mu + 2.0 * c - 1.0, 0.7), plates=["N"])
    return m


def new_params():
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.5, 0.0, 0.2)]


def train(x: torch.Tensor, args: argparse.Namespace, shard) -> list:
    """Adam on the TMC objective -log P_TMC (one fresh estimate per step), sharded or on one process.

    One process draws mu from torch's stream set to the start of the sharded run's shared stream, so
    both runs see the same samples and follow the same trajectory up to float reduction order."""
    params = new_params()
    opt = torch.optim.Adam(params, lr=0.05)
    est = build(x.shape[-1], params).compile(K=args.K, shard=shard)
    saved = torch.get_rng_state()
    if shard is None:
        torch.set_rng_state(torch.Generator().manual_seed(args.seed + 1).get_state())
    try:
        for _ in range(args.train):
            opt.zero_grad()
            (-est.log_marginal({"x": x})).backward()
            if shard is not None:
                all_reduce_grads(params)
            opt.step()
    finally:
        torch.set_rng_state(saved)
    return [float(p.detach()) for p in params]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1001, help="N, split across the processes")
    parser.add_argument("--K", type=int, default=64, help="samples of mu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the shared stream")
    parser.add_argument("--train", type=int, default=0, metavar="STEPS",
                        help="also train (a, log_s, w) by Adam on the sharded -log p(x) estimate for STEPS steps, "
                             "and on one process (rank 0) from the same stream; report both")
    parser.add_argument("--json", action="store_true", help="print one JSON object (rank 0)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # plain `python examples/distributed_tmc.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        g = torch.Generator().manual_seed(args.seed)
        mu_true = 1.5
        c = torch.rand(args.points, generator=g, dtype=torch.float64) < 0.6
        x = mu_true + 2.0 * c - 1.0 + 0.7 * torch.randn(args.points, generator=g, dtype=torch.float64)
        shard = torch.tensor_split(x, world)[rank]  # unequal shards when N is not a multiple of the world size

        params = new_params()
        est = build(shard.shape[-1], params).compile(K=args.K, shard=Shard("N", seed=args.seed))
        log_p = est.log_marginal({"x": shard})
        log_p.backward()
        all_reduce_grads(params)
        grads = torch.stack([p.grad for p in params])
        mu_mean = est.posterior({"x": shard}).mean("mu")

        trained = train(shard, args, Shard("N", seed=args.seed + 1)) if args.train else None

        if rank == 0:
            single_params = new_params()
            single = build(args.points, single_params).compile(K=args.K)
            saved = torch.get_rng_state()
            torch.set_rng_state(torch.Generator().manual_seed(args.seed).get_state())  # the shared stream's start
            single_log_p = single.log_marginal({"x": x})
            torch.set_rng_state(saved)
            single_log_p.backward()
            single_grads = torch.stack([p.grad for p in single_params])
            out = {"log_marginal": float(log_p.detach()), "single_process": float(single_log_p.detach()),
                   "max_grad_diff": float((grads - single_grads).abs().max()),
                   "grads": [round(float(v), 6) for v in grads], "posterior_mean_mu": float(mu_mean.detach()),
                   "processes": world, "points": args.points,
                   "shard_sizes": [len(s) for s in torch.tensor_split(x, world)], "K": args.K}
            if trained is not None:
                single_trained = train(x, args, None)
                out["train"] = {"steps": args.train, "sharded": [round(v, 6) for v in trained],
                                "single_process": [round(v, 6) for v in single_trained],
                                "max_param_diff": max(abs(a - b) for a, b in zip(trained, single_trained))}
            if args.json:
                print(json.dumps(out))
            else:
                print(f"{world} process(es), N={args.points} split {out['shard_sizes']}, K={args.K}")
                print(f"  sharded log p(x) estimate {out['log_marginal']:.10f}")
                print(f"  single process            {out['single_process']:.10f}")
                print(f"  gradients (a, log_s, w)   {out['grads']}; largest difference {out['max_grad_diff']:.2e}")
                print(f"  posterior mean of mu      {out['posterior_mean_mu']:.4f} (true 1.5)")
                if "train" in out:
                    t = out["train"]
                    print(f"  after {t['steps']} Adam steps (a, log_s, w): sharded {t['sharded']}, one process "
                          f"{t['single_process']}; largest difference {t['max_param_diff']:.2e}")
        dist.barrier()  # no process tears the group down while another still works (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
