"""Training the GMM proposals: APG (eqs. 5, Algorithm 3) and the RWS baselines, with checkpoints and resume.

A run lives in one directory::

    DIR/config.json      the run's settings (a resumed run must match them)
    DIR/checkpoint.pt    networks, optimizer, schedule, RNG state, iteration
    DIR/metrics.csv      one row per logged iteration
    DIR/proposals.pt     the trained networks alone (written at the end; what evaluation loads)

Reproducibility: the training datasets are simulated from ``seed``; the batch
of iteration ``t`` is a function of ``(seed, t)`` alone; the sampler's
randomness is torch's global generator, whose state is checkpointed.  Ctrl-C or
SIGTERM stops the run at the next iteration boundary and writes a checkpoint
there, so a run that is interrupted and resumed ends in exactly the state of an
uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch
from tqdm import tqdm

from . import gmm
from .sampler import run

__all__ = ["METHODS", "TrainConfig", "load_proposals", "make_proposals", "train"]

#: method name -> (one-shot encoder, conditional globals kernel)
METHODS = {"apg": ("mlp", True), "rws-mlp": ("mlp", False), "rws-lstm": ("lstm", False)}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the paper's: batch 20, K=10, L=10, Adam lr 1e-4, 20,000 datasets).

    ``num_sweeps`` is 1 for the RWS baselines (a one-shot proposal, trained by RWS).
    The learning rate decays exponentially from ``lr`` to ``lr_final``.
    """

    method: str = "apg"
    iterations: int = 40000
    batch_size: int = 20
    num_particles: int = 10
    num_sweeps: int = 10
    lr: float = 1e-3
    lr_final: float = 1e-4
    num_datasets: int = 20000
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    threads: int = 0  # 0: leave torch's default
    init: str = ""  # start from these trained networks (a proposals file of the same method)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in ("iterations", "batch_size", "num_particles", "num_sweeps", "num_datasets", "log_every",
                     "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.method != "apg" and self.num_sweeps != 1:
            raise ValueError(f"{self.method} is a one-shot (RWS) method: num_sweeps must be 1, got {self.num_sweeps}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError(f"lr and lr_final must be positive, got {self.lr} and {self.lr_final}")


def make_proposals(method: str, cfg: Optional[gmm.GMMConfig] = None) -> gmm.GMMProposals:
    """Fresh networks of ``method`` (see :data:`METHODS`) for the GMM ``cfg`` (default: the paper's)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    encoder, conditional = METHODS[method]
    return gmm.GMMProposals(cfg or gmm.GMMConfig(), encoder=encoder, conditional=conditional)


def load_proposals(path: str) -> gmm.GMMProposals:
    """Networks saved by :func:`train`: ``DIR/proposals.pt`` (a finished run) or ``DIR/checkpoint.pt``
    (an unfinished one; its method is read from ``DIR/config.json``)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" in blob:
        nets = make_proposals(blob["method"], gmm.GMMConfig(**blob["gmm"]))
        nets.load_state_dict(blob["state_dict"])
        return nets
    with open(os.path.join(os.path.dirname(path), "config.json")) as f:
        method = json.load(f)["method"]
    nets = make_proposals(method)
    nets.load_state_dict(blob["nets"])
    return nets


def _batch(data: torch.Tensor, cfg: TrainConfig, t: int) -> torch.Tensor:
    """The batch of iteration ``t``: epoch-wise permutations seeded by ``(seed, epoch)``."""
    per_epoch = cfg.num_datasets // cfg.batch_size
    epoch, k = divmod(t, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(cfg.num_datasets, generator=g)
    return data[perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]]


FIELDS = ["iteration", "seconds", "lr", "loss", "log_evidence", "log_joint", "ess_init", "ess_globals",
          "ess_assignments", "kl_globals", "kl_assignments"]


def _atomic_save(obj: object, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out_dir: str, cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
          on_step: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Train (or resume training) one method; returns the last logged metrics.

    Args:
        out_dir: the run directory (created).
        cfg: the settings; a run resumed from ``out_dir`` must have the same.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show a tqdm bar.
        on_step: called with the iteration number after every step (tests use
            it to interrupt a run).
    """
    os.makedirs(out_dir, exist_ok=True)
    cfg_path, ckpt_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "checkpoint.pt")
    csv_path = os.path.join(out_dir, "metrics.csv")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gcfg = gmm.GMMConfig()
    torch.manual_seed(cfg.seed)  # the initial weights (a resumed run loads its own, and the RNG state)
    nets = make_proposals(cfg.method, gcfg)
    opt = torch.optim.Adam(nets.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    decay = math.log(cfg.lr_final / cfg.lr) / cfg.iterations
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: math.exp(decay * min(t, cfg.iterations)))
    start, elapsed = 0, 0.0
    if resume and os.path.exists(ckpt_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        if saved != asdict(cfg):
            diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
            raise ValueError(f"{out_dir} holds a run with other settings (saved, given): {diff}; "
                             "use another directory or resume=False")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        nets.load_state_dict(ck["nets"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        start, elapsed = ck["iteration"], ck["seconds"]
        _truncate_csv(csv_path, start)
    else:
        if cfg.init:
            start_from = load_proposals(cfg.init)
            if METHODS[cfg.method] != (start_from.encoder, start_from.globals is not None):
                raise ValueError(f"--init {cfg.init} holds networks of another method than {cfg.method!r}")
            nets.load_state_dict(start_from.state_dict())
        with open(cfg_path, "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
    data = gmm.simulate(cfg.num_datasets, gcfg, seed=cfg.seed + 7919)["x"]
    sampler = gmm.apg_sampler(nets)

    def checkpoint(t: int, seconds: float) -> None:
        _atomic_save({"nets": nets.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "rng": torch.get_rng_state(), "iteration": t, "seconds": seconds}, ckpt_path)

    # Ctrl-C / SIGTERM only set a flag: the run stops at the next iteration boundary, after writing a
    # checkpoint, so an interrupted run resumes exactly (a second Ctrl-C exits at once, keeping the
    # last periodic checkpoint).
    stop = {"flag": False}
    handlers = {}

    def request_stop(signum, frame):
        stop["flag"] = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, handlers[signal.SIGINT])
        tqdm.write("stopping after this iteration (a checkpoint will be written)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no handlers
            pass
    last: Dict[str, float] = {}
    t = start
    t0 = time.perf_counter()
    at_boundary = True
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=f"train {cfg.method}", unit="it")
    try:
        while t < cfg.iterations:
            at_boundary = False
            x = _batch(data, cfg, t)
            res = run(sampler, x, cfg.num_particles, cfg.num_sweeps, objective=True,
                      record_log_joint=(t + 1) % cfg.log_every == 0)
            opt.zero_grad(set_to_none=True)
            res.loss_phi.backward()
            opt.step()
            sched.step()
            t += 1
            if t % cfg.log_every == 0:
                last = _metrics(nets, x, res, t, elapsed + time.perf_counter() - t0, sched.get_last_lr()[0])
                with open(csv_path, "a", newline="") as f:
                    csv.writer(f).writerow([last.get(k, "") for k in FIELDS])
                bar.set_postfix(loss=f"{last['loss']:.1f}", ess_c=f"{last.get('ess_assignments', float('nan')):.2f}")
            bar.update(1)
            if t % cfg.checkpoint_every == 0 or t == cfg.iterations:
                checkpoint(t, elapsed + time.perf_counter() - t0)
            at_boundary = True
            if on_step is not None:
                on_step(t)
            if stop["flag"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if at_boundary:  # a consistent state: iteration t is complete
            checkpoint(t, elapsed + time.perf_counter() - t0)
        bar.close()
        raise
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    bar.close()
    _atomic_save({"method": cfg.method, "gmm": asdict(gcfg), "state_dict": nets.state_dict(),
                  "train": asdict(cfg)}, os.path.join(out_dir, "proposals.pt"))
    return last


def _truncate_csv(path: str, iteration: int) -> None:
    """Drop rows logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def _metrics(nets: gmm.GMMProposals, x: torch.Tensor, res, t: int, seconds: float, lr: float) -> Dict[str, float]:
    last = res.sweeps[-1]
    out = {"iteration": t, "seconds": round(seconds, 2), "lr": lr, "loss": res.loss_phi.item(),
           "log_evidence": last.log_evidence.mean().item(), "log_joint": last.mean_log_joint().mean().item(),
           "ess_init": res.sweeps[0].ess["init"].mean().item()}
    for name, v in last.ess.items():
        if name != "init":
            out[f"ess_{name}"] = v.mean().item()
    kl = gmm.inclusive_kl(nets, x, res.state, res.log_w)
    for name, v in kl.items():
        out[f"kl_{name}"] = v.mean().item()
    return out
