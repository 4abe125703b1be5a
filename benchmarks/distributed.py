"""Scaling of a plate-sharded TMC objective step over processes (torch.distributed, gloo, this machine).

Model (float32): mu ~ N(0, 1), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5^2); learned proposals
mu ~ N(a, exp(b)), z_n ~ N(c_n, exp(d_n)), K samples of each; plate N sharded.  One step: sample, build
factors, contract (one all-reduce of the plate product, a (K,) tensor), backward, and the all-reduce of the
replicated parameters' gradients (a, b).

* strong scaling: N fixed, split over P processes;
* weak scaling: N / P fixed per process.

Each configuration runs in its own spawned process group (one torch thread per process), ``--repeats``
timed steps after 2 warm-ups; we report the median step time of rank 0, the time spent in collectives
(forward all-reduce and gradient all-reduce, measured around the calls) and the bytes they move.

    python benchmarks/distributed.py --processes 1 2 --N 8000 --K 32 --repeats 9 \
        --json benchmarks/results/distributed.json

Reports speed-ups (1-process time / P-process time) measured in the same run, never bare times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import Normal

import tmcgraph
from tmcgraph.arguments import output_file
from tmcgraph.distributed import Shard


def _model(n, params):
    a, b, c, d = params
    m = tmcgraph.Model()
    m.plate("N", n)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(a, b.exp()))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda: Normal(c, d.exp()), plates=["N"],
             proposal_parents=[])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    return m


def _worker(rank, world, init_file, n_local, K, repeats, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(n_local, generator=g) + 1.0
        a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
        c, d = torch.zeros(n_local, requires_grad=True), torch.zeros(n_local, requires_grad=True)
        shard = Shard("N", seed=0)
        comm = {"t": 0.0, "bytes": 0}
        reduce = shard.all_reduce

        def timed_reduce(t):
            t0 = time.perf_counter()
            out = reduce(t)
            comm["t"] += time.perf_counter() - t0
            comm["bytes"] += t.numel() * t.element_size()
            return out

        shard.all_reduce = timed_reduce  # type: ignore[method-assign]
        est = _model(n_local, (a, b, c, d)).compile(K=K, shard=shard)
        steps, comms, volume = [], [], []
        for r in range(repeats + 2):
            for p in (a, b, c, d):
                p.grad = None
            comm.update(t=0.0, bytes=0)
            dist.barrier()
            t0 = time.perf_counter()
            loss = -est.log_marginal({"x": x})
            loss.backward()
            t1 = time.perf_counter()
            grads = torch.stack([a.grad, b.grad])
            dist.all_reduce(grads)  # the replicated parameters' gradient shares
            t2 = time.perf_counter()
            if r >= 2:
                steps.append(t2 - t0)
                comms.append(comm["t"] + (t2 - t1))
                volume.append(comm["bytes"] + grads.numel() * grads.element_size())
        if rank == 0:
            torch.save({"step": statistics.median(steps), "comm": statistics.median(comms),
                        "bytes": volume[0]}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(world, n_local, K, repeats):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), n_local, K, repeats, out), nprocs=world, join=True)
        return torch.load(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--N", type=int, default=8000, help="total N (strong scaling) / N per process (weak)")
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over rounds)")
    p.add_argument("--json", type=output_file, default=None, help="write the results here")
    args = p.parse_args(argv)
    results = {}
    for _ in range(args.rounds):  # interleave the configurations: the machine is shared and noisy
        for kind in ("strong", "weak"):
            for P in args.processes:
                n_local = args.N // P if kind == "strong" else args.N
                r = measure(P, n_local, args.K, args.repeats)
                results.setdefault((kind, P), []).append(r)
    rows = []
    for kind in ("strong", "weak"):
        base = statistics.median(r["step"] for r in results[(kind, args.processes[0])])
        for P in args.processes:
            rs = results[(kind, P)]
            step = statistics.median(r["step"] for r in rs)
            comm = statistics.median(r["comm"] for r in rs)
            n_total = args.N if kind == "strong" else args.N * P
            rows.append({"scaling": kind, "processes": P, "N_total": n_total, "N_per_process": n_total // P,
                         "K": args.K, "speedup_vs_1": round(base / step, 3),
                         "throughput_vs_1": round(base / step * (n_total / (args.N if kind == "strong" else args.N)),
                                                  3),
                         "comm_fraction": round(comm / step, 4), "bytes_per_step": rs[0]["bytes"]})
    print(f"{'scaling':<8}{'P':>3}{'N total':>9}{'N/proc':>8}{'speed-up':>10}{'throughput':>12}{'comm %':>8}"
          f"{'bytes/step':>12}")
    for r in rows:
        print(f"{r['scaling']:<8}{r['processes']:>3}{r['N_total']:>9}{r['N_per_process']:>8}{r['speedup_vs_1']:>10.2f}"
              f"{r['throughput_vs_1']:>12.2f}{100 * r['comm_fraction']:>8.2f}{r['bytes_per_step']:>12}")
    print("(speed-up: 1-process step time / P-process step time; throughput: points per second relative to 1 "
          "process; comm %: share of the step in collectives)")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "settings": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
