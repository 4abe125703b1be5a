"""Data-parallel training (2-process gloo groups on localhost) follows the single-process trajectory."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apg.errors import APGError
from apg.train import TrainConfig, train

TINY = dict(iterations=10, batch_size=4, num_particles=4, num_sweeps=3, num_datasets=16, log_every=5,
            checkpoint_every=4, seed=5, threads=1, streams=2)


def _worker(rank, world, init_file, out_dir, interrupt_at):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(**TINY)

        def stop(t):
            if t == interrupt_at:
                raise KeyboardInterrupt

        if interrupt_at:
            try:
                train(out_dir, cfg, progress=False, on_step=stop)
            except KeyboardInterrupt:
                pass
        train(out_dir, cfg, progress=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, name, interrupt_at=0):
    out = str(tmp_path / name)
    mp.spawn(_worker, args=(2, str(tmp_path / f"{name}.init"), out, interrupt_at), nprocs=2, join=True)
    return out


def _load(d):
    return torch.load(f"{d}/proposals.pt", weights_only=False)["state_dict"]


def _rows(d):
    with open(f"{d}/metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_trajectory_and_resume(tmp_path):
    single = str(tmp_path / "single")
    train(single, TrainConfig(**TINY), progress=False)
    two = _spawn(tmp_path, "two")
    a, b = _load(single), _load(two)
    for k in a:  # with two slices, one process sums g0/2 + g1/2 and the all-reduce g0/2 + g1/2: bit-equal
        assert torch.equal(a[k], b[k]), k
    # power: one process with another randomness (1 stream) ends elsewhere
    other = str(tmp_path / "other")
    train(other, TrainConfig(**{**TINY, "streams": 1}), progress=False)
    assert max(float((_load(other)[k] - b[k]).abs().max()) for k in b) > 1e-3
    for ra, rb in zip(_rows(single), _rows(two)):
        assert ra["iteration"] == rb["iteration"]
        for k in ra:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-3, abs=1e-3), k
    # interrupted at iteration 6 (between checkpoints) and resumed: bit for bit the uninterrupted run
    resumed = _spawn(tmp_path, "resumed", interrupt_at=6)
    c = _load(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert _rows(two) == _rows(resumed)


def test_streams_must_divide_the_batch():
    with pytest.raises(APGError, match=r"batch_size 4 must be a multiple of streams 3 \(--batch, --streams\)"):
        TrainConfig(**{**TINY, "streams": 3})


@pytest.mark.slow
def test_apg_train_under_torchrun_matches_one_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "torchrun")
    flags = ["--iterations", "6", "--batch", "4", "--particles", "4", "--sweeps", "3", "--datasets", "16",
             "--log-every", "3", "--checkpoint-every", "4", "--seed", "5", "--threads", "1", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "apg.cli", "train", "gmm", "--out", out] + flags
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single = str(tmp_path / "single")
    train(single, TrainConfig(iterations=6, batch_size=4, num_particles=4, num_sweeps=3, num_datasets=16,
                              log_every=3, checkpoint_every=4, seed=5, threads=1, streams=2), progress=False)
    a, b = _load(single), _load(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
