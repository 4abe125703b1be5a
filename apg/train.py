"""Generic training of APG samplers: proposals (phi) and model parameters (theta), with checkpoints and resume.

One loop serves every registered model (`apg.models`).  Each iteration
runs the sampler on a batch of training datasets (Algorithm 3 of Wu et al.,
ICML 2020) and takes one step of each optimizer: Adam on the proposal
parameters with eq. 5's gradient (`apg.objectives.phi_loss`), and, when
the model has learned parameters, Adam on them with eq. 6's
(`apg.objectives.theta_loss`).  Both learning rates decay exponentially
from ``lr`` to ``lr_final``.

A run lives in one directory::

    DIR/config.json      the run's settings (a resumed run must match them)
    DIR/problem.json     the model's own settings (Problem.config: e.g. a data source; must match too)
    DIR/checkpoint.pt    networks, optimizers, schedules, generator state, iteration
    DIR/metrics.csv      one row per logged iteration
    DIR/proposals.pt     the trained networks alone (written at the end; what evaluation loads)

Reproducibility: the training datasets come from ``seed``; the batch of
iteration ``t`` is a function of ``(seed, t)`` alone; the sampler draws from a
``torch.Generator`` whose state is checkpointed (it continues torch's default
stream after the networks are initialised from ``seed``).  Ctrl-C or SIGTERM
stops the run at the next iteration boundary and writes a checkpoint there, so
a run that is interrupted and resumed ends in exactly the state of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from . import models
from .errors import APGError
from .models.base import Problem
from .models.common import resolve_device
from .objectives import phi_loss, theta_loss
from .resampling import SCHEMES
from .sampler import Result, run
from .trained import Trained, load_proposals

__all__ = ["FLAGS", "TrainConfig", "Trained", "load_proposals", "train"]

#: TrainConfig field -> the ``apg train`` flag that sets it (named in errors)
FLAGS = {"model": "MODEL", "method": "--method", "iterations": "--iterations", "batch_size": "--batch",
         "num_particles": "--particles", "num_sweeps": "--sweeps", "lr": "--lr", "lr_final": "--lr-final",
         "num_datasets": "--datasets", "seed": "--seed", "log_every": "--log-every",
         "checkpoint_every": "--checkpoint-every", "threads": "--threads", "init": "--init", "streams": "--streams",
         "device": "--device", "compile": "--compile", "resampling": "--resampling"}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    The defaults are those of the shipped GMM APG checkpoint (batch 20, K=10, L=10,
    20,000 datasets as in the paper; Adam with the learning rate decaying from
    2e-3 to 1e-4 over 32,000 iterations, one thread); ``apg train`` takes each
    method's own defaults from its model (`apg.models.Method`).
    ``num_sweeps`` is 1 for one-shot (RWS) methods.
    """

    model: str = "gmm"
    method: str = "apg"
    iterations: int = 32000
    batch_size: int = 20
    num_particles: int = 10
    num_sweeps: int = 10
    lr: float = 2e-3
    lr_final: float = 1e-4
    num_datasets: int = 20000
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 500
    threads: int = 1  # 0: leave torch's default
    init: str = ""  # start from these trained networks (a proposals file of the same method)
    streams: int = 1  # random streams per batch: the batch is split into this many slices, one generator each
    device: str = "cpu"  # where the networks, the data and the sampler run ("cuda", "cuda:1", ...)
    compile: bool = False  # run each iteration's sampler and loss as a torch.compile'd program (one stream)
    resampling: str = "systematic"  # the scheme before every block update (apg.resampling.SCHEMES)

    def __post_init__(self) -> None:
        problem = models.get(self.model)
        method = problem.method(self.method)
        for name in ("iterations", "batch_size", "num_particles", "num_sweeps", "num_datasets", "log_every",
                     "checkpoint_every", "streams"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise APGError(f"{name} must be a positive int, got {v!r} ({FLAGS[name]})")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise APGError(f"threads must be a non-negative int, got {self.threads!r} (--threads)")
        if method.one_shot and self.num_sweeps != 1:
            raise APGError(f"{self.method} is a one-shot (RWS) method: num_sweeps must be 1, got {self.num_sweeps} "
                           "(--sweeps)")
        if not (self.lr > 0 and self.lr_final > 0):
            raise APGError(f"lr and lr_final must be positive, got {self.lr} and {self.lr_final} (--lr, --lr-final)")
        resolve_device(self.device)
        if self.resampling not in SCHEMES:
            raise APGError(f"resampling must be one of {list(SCHEMES)}, got {self.resampling!r} (--resampling)")
        if not isinstance(self.compile, bool):
            raise APGError(f"compile must be True or False, got {self.compile!r} (--compile)")
        if self.compile and self.streams != 1:
            raise APGError(f"compile runs one random stream: streams must be 1, got {self.streams} "
                           "(--compile, --streams)")
        if self.batch_size % self.streams:
            raise APGError(f"batch_size {self.batch_size} must be a multiple of streams {self.streams} "
                           "(--batch, --streams)")
        if self.batch_size > self.num_datasets:
            raise APGError(f"batch_size {self.batch_size} exceeds num_datasets {self.num_datasets} "
                           "(--batch, --datasets)")

    @classmethod
    def for_method(cls, model: str, method: str, **settings: Any) -> "TrainConfig":
        """The method's defaults (those of its shipped checkpoint), overridden by ``settings``."""
        defaults = dict(models.get(model).method(method).train_defaults)
        unknown = [k for k in settings if k not in {f.name for f in fields(cls)}]
        if unknown:
            raise APGError(f"unknown training settings {unknown}")
        return cls(model=model, method=method, **{**defaults, **settings})


def _batch(data: torch.Tensor, cfg: TrainConfig, t: int) -> torch.Tensor:
    """The batch of iteration ``t``: epoch-wise permutations seeded by ``(seed, epoch)``."""
    per_epoch = cfg.num_datasets // cfg.batch_size
    epoch, k = divmod(t, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(cfg.num_datasets, generator=g)
    return data[perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]]


BASE_FIELDS = ["iteration", "seconds", "lr", "loss", "log_evidence", "log_joint", "ess_init"]


def _fields(problem: Problem, has_theta: bool) -> List[str]:
    return BASE_FIELDS + (["loss_theta"] if has_theta else []) + list(problem.metric_fields)


def _atomic_save(obj: object, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _optimizer(params: List[nn.Parameter], cfg: TrainConfig):
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99))
    decay = math.log(cfg.lr_final / cfg.lr) / cfg.iterations
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: math.exp(decay * min(t, cfg.iterations)))


def _settings_clash(out_dir: str, saved: Dict[str, Any], cfg: TrainConfig) -> APGError:
    given = asdict(cfg)
    diff = ", ".join(f"{FLAGS.get(k, k)} {given[k]!r} (the run has {saved.get(k)!r})"
                     for k in given if saved.get(k) != given[k])
    return APGError(f"{out_dir} holds a run with other settings: {diff}; resume it with its own settings, "
                    "use another --out, or pass --restart to start over")


class _RunFiles(NamedTuple):
    """The files of a run directory (see the module docstring)."""

    out_dir: str
    config: str
    problem: str
    checkpoint: str
    metrics: str
    proposals: str

    @classmethod
    def at(cls, out_dir: str) -> "_RunFiles":
        names = ("config.json", "problem.json", "checkpoint.pt", "metrics.csv", "proposals.pt")
        return cls(out_dir, *(os.path.join(out_dir, name) for name in names))


def _check_resumable(files: _RunFiles, cfg: TrainConfig, problem: Problem) -> None:
    """A run resumed from ``files`` must have the settings and the model settings it was started with."""
    with open(files.config) as f:
        saved = json.load(f)
    saved = {**{k: v for k, v in asdict(TrainConfig(model=cfg.model, method=cfg.method)).items()
                if k in ("streams", "device", "compile", "resampling")}, **saved}  # runs from before these settings
    if saved != asdict(cfg):
        raise _settings_clash(files.out_dir, saved, cfg)
    saved_problem = problem.config()  # runs from before problem.json: the default settings
    if os.path.exists(files.problem):
        with open(files.problem) as f:
            # through the model's own reading, so settings added since the run started take their defaults
            saved_problem = problem.with_config(json.load(f)).config()
    if json.loads(json.dumps(saved_problem)) != json.loads(json.dumps(problem.config())):
        raise APGError(f"{files.out_dir} holds a run of {cfg.model} with the model settings {saved_problem}, not "
                       f"{problem.config()}; resume it with its own model options, use another --out, or "
                       "pass --restart to start over")


def _start_run(files: _RunFiles, cfg: TrainConfig, problem: Problem, fields_: List[str]) -> None:
    """Write a new run's settings and the header of its metrics."""
    with open(files.config, "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    with open(files.problem, "w") as f:
        json.dump(problem.config(), f, indent=1)
    with open(files.metrics, "w", newline="") as f:
        csv.writer(f).writerow(fields_)


class _Learner:
    """What a checkpoint holds.

    The networks, their optimizers and schedules, and the sampler's random streams (this process's generators; every
    stream's state is gathered when a checkpoint is written).

    Built in a fixed order, so a run is a function of its settings: torch is seeded with ``seed``, the
    networks are initialised (on the CPU: the same weights on every device), then the streams are made
    (stream 0 continues torch's default stream from there, in a generator of its own; stream ``j > 0`` is
    seeded from ``(seed, j)``; on another device every stream is seeded from ``(seed, j)``, as a CPU
    generator's state does not fit it).
    """

    def __init__(self, problem: Problem, cfg: TrainConfig, device: torch.device, world: int, rank: int) -> None:
        torch.manual_seed(cfg.seed)  # the initial weights (a resumed run loads its own)
        self.proposals = problem.make_proposals(cfg.method)
        self.model = problem.make_model()
        seeds = [cfg.seed * 1_000_003 + 104_729 * j for j in range(cfg.streams)]
        if device.type == "cpu":
            self.states = [torch.get_rng_state()] + [torch.Generator().manual_seed(sd).get_state()
                                                     for sd in seeds[1:]]
        else:
            self.states = [torch.Generator(device=device).manual_seed(sd).get_state() for sd in seeds]
        self.proposals.to(device)
        self.model.to(device)
        per_rank = cfg.streams // world
        self.mine = list(range(rank * per_rank, (rank + 1) * per_rank))  # this process's streams
        self.generators = [torch.Generator(device=device) for _ in self.mine]
        self.opt_phi, self.sched_phi = _optimizer(list(self.proposals.parameters()), cfg)
        self.theta = list(self.model.parameters())
        self.opt_theta: Optional[torch.optim.Optimizer] = None
        self.sched_theta: Optional[Any] = None
        if self.theta:
            self.opt_theta, self.sched_theta = _optimizer(self.theta, cfg)
        self.streams = cfg.streams

    @property
    def params(self) -> List[nn.Parameter]:
        return list(self.proposals.parameters()) + self.theta

    def load(self, ck: Dict[str, Any]) -> Tuple[int, float]:
        """Restore a checkpoint; returns its ``(iteration, seconds)``."""
        self.proposals.load_state_dict(ck["proposals"])
        self.opt_phi.load_state_dict(ck["opt_phi"])
        self.sched_phi.load_state_dict(ck["sched_phi"])
        if self.opt_theta is not None and self.sched_theta is not None:
            self.model.load_state_dict(ck["model"])
            self.opt_theta.load_state_dict(ck["opt_theta"])
            self.sched_theta.load_state_dict(ck["sched_theta"])
        self.states = ck.get("generators", [ck["generator"]])
        return ck["iteration"], ck["seconds"]

    def start_streams(self) -> None:
        """Set this process's generators to their streams' states (fresh or loaded)."""
        for g, j in zip(self.generators, self.mine):
            g.set_state(self.states[j])

    def checkpoint(self, t: int, seconds: float, all_states: List[Any]) -> Dict[str, Any]:
        blob = {"proposals": self.proposals.state_dict(), "opt_phi": self.opt_phi.state_dict(),
                "sched_phi": self.sched_phi.state_dict(), "generator": all_states[0], "iteration": t,
                "seconds": seconds}
        if self.streams > 1:
            blob["generators"] = all_states
        if self.opt_theta is not None and self.sched_theta is not None:
            blob.update(model=self.model.state_dict(), opt_theta=self.opt_theta.state_dict(),
                        sched_theta=self.sched_theta.state_dict())
        return blob

    def zero_grad(self) -> None:
        self.opt_phi.zero_grad(set_to_none=True)
        if self.opt_theta is not None:
            self.opt_theta.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.opt_phi.step()
        self.sched_phi.step()
        if self.opt_theta is not None and self.sched_theta is not None:
            self.opt_theta.step()
            self.sched_theta.step()


@contextlib.contextmanager
def _stop_requests() -> Iterator[Dict[str, bool]]:
    """Within the block Ctrl-C and SIGTERM only set ``flag["stop"]``.

    The run stops at the next iteration boundary, after writing a checkpoint, so an interrupted run resumes exactly (a
    second Ctrl-C exits at once, keeping the last periodic checkpoint). The previous handlers are restored after the
    block.
    """
    flag = {"stop": False}
    handlers: Dict[int, Any] = {}

    def request_stop(signum, frame):
        flag["stop"] = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, handlers[signal.SIGINT])
        tqdm.write("stopping after this iteration (a checkpoint will be written)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no handlers
            pass
    try:
        yield flag
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


_Pending = List[Tuple[torch.Tensor, Result, torch.Tensor, Optional[torch.Tensor]]]


def _gradients(learner: _Learner, sampler: Any, problem: Problem, cfg: TrainConfig, x: torch.Tensor,
               compiled: Optional[Callable[[torch.Tensor], torch.Tensor]], log_now: bool,
               device: torch.device) -> _Pending:
    """One iteration's gradients on batch ``x`` (eq. 5, and eq. 6 when theta is learned).

    Each of this process's streams on its slice of the batch; the slices' results when the iteration is logged.
    """
    pending: _Pending = []
    size = cfg.batch_size // cfg.streams
    if compiled is not None and not log_now:  # one stream: its generator's state drives torch's
        g = learner.generators[0]
        _set_rng_state(device, g.get_state())
        compiled(x).backward()
        g.set_state(_get_rng_state(device))
        return pending
    for g, j in zip(learner.generators, learner.mine):
        xj = x if cfg.streams == 1 else x[j * size:(j + 1) * size]
        if compiled is not None:  # an eager iteration of a compiled run draws from the same stream
            _set_rng_state(device, g.get_state())
        res = run(sampler, xj, cfg.num_particles, cfg.num_sweeps, objective=True, scheme=cfg.resampling,
                  learn_model=problem.theta_terms if learner.theta else False,
                  record_log_joint=log_now, generator=g if compiled is None else None)
        loss = phi_loss(res.sweeps)
        loss_theta = theta_loss(res.sweeps) if learner.theta else None
        total = loss if loss_theta is None else loss + loss_theta
        # the batch's loss is the mean of the slices' (equal sizes): the same gradient as one slice
        (total if cfg.streams == 1 else total / cfg.streams).backward()
        if compiled is not None:
            g.set_state(_get_rng_state(device))
        if log_now:
            pending.append((xj, res, loss, loss_theta))
    return pending


def train(out_dir: str, cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
          on_step: Optional[Callable[[int], None]] = None, problem: Optional[Problem] = None) -> Dict[str, float]:
    """Train (or resume training) one method of one model; returns the last logged metrics.

    Args:
        out_dir: the run directory (created).
        cfg: the settings; a run resumed from ``out_dir`` must have the same.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show a tqdm bar (on stderr).
        on_step: called with the iteration number after every step (tests use
            it to interrupt a run).
        problem: the model with its settings (default: ``cfg.model``'s defaults); its
            `config` is written to ``DIR/problem.json`` and a
            resumed run must have the same.

    Raises:
        APGError: settings that differ from those of the run in ``out_dir``
            (naming the flags), or an ``init`` file of another method.
    """
    if problem is None:
        problem = models.get(cfg.model)
    elif problem.name != cfg.model:
        raise APGError(f"the problem is {problem.name!r} but the settings are for {cfg.model!r}")
    world, rank = _world()
    if cfg.streams % world:
        raise APGError(f"streams {cfg.streams} must be a multiple of the number of processes {world} (--streams)")
    lead = rank == 0  # writes the files and shows progress
    os.makedirs(out_dir, exist_ok=True)
    files = _RunFiles.at(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    learner = _Learner(problem, cfg, device, world, rank)
    fields_ = _fields(problem, bool(learner.theta))
    start, elapsed = 0, 0.0
    if resume and os.path.exists(files.checkpoint):
        _check_resumable(files, cfg, problem)
        start, elapsed = learner.load(torch.load(files.checkpoint, map_location="cpu", weights_only=False))
        if lead:
            _truncate_csv(files.metrics, start, fields_)
        if start >= cfg.iterations and os.path.exists(files.proposals):
            if lead:
                tqdm.write(f"the run in {out_dir} is already finished ({start} iterations); nothing to do",
                           file=sys.stderr)
            return _last_row(files.metrics)
    else:
        if cfg.init:
            problem.init_from(cfg.method, learner.proposals, learner.model, load_proposals(cfg.init))
        if lead:
            _start_run(files, cfg, problem, fields_)
    _barrier(world)  # every process has read the run's files before rank 0 writes new ones
    learner.start_streams()
    data = problem.training_data(cfg.num_datasets, cfg.seed).to(device)
    sampler = problem.sampler(learner.proposals, learner.model)

    def checkpoint(t: int, seconds: float) -> None:
        all_states = _gather([g.get_state() for g in learner.generators], world)  # every stream, in order
        if lead:
            _atomic_save(learner.checkpoint(t, seconds, all_states), files.checkpoint)
        _barrier(world)  # the file is on disk before any process goes on (a resume reads it)

    last: Dict[str, float] = {}
    t = start
    t0 = time.perf_counter()
    at_boundary = True
    bar = tqdm(total=cfg.iterations, initial=start, disable=not (progress and lead),
               desc=f"train {cfg.model} {cfg.method}", unit="it")
    compiled = (_compiled_loss(sampler, problem, cfg, bool(learner.theta), _batch(data, cfg, t))
                if cfg.compile else None)
    # under torchrun the processes agree on stopping at every iteration boundary
    with _stop_requests() as stop:
        try:
            while t < cfg.iterations:
                at_boundary = False
                x = _batch(data, cfg, t)
                log_now = (t + 1) % cfg.log_every == 0
                learner.zero_grad()
                pending = _gradients(learner, sampler, problem, cfg, x, compiled, log_now, device)
                if world > 1:
                    _all_reduce_grads(learner.params)
                learner.step()
                t += 1
                if log_now:  # the metrics of the updated networks on this iteration's batch
                    last = _average([_metrics(problem, learner.proposals, learner.model, xj, res, loss, loss_theta,
                                              t, 0.0, 0.0) for xj, res, loss, loss_theta in pending], world)
                    last.update(iteration=t, seconds=round(elapsed + time.perf_counter() - t0, 2),
                                lr=learner.sched_phi.get_last_lr()[0])
                    if lead:
                        with open(files.metrics, "a", newline="") as f:
                            csv.writer(f).writerow([last.get(k, "") for k in fields_])
                    bar.set_postfix(loss=f"{last['loss']:.1f}", ess=f"{last.get('ess_init', float('nan')):.2f}")
                bar.update(1)
                if t % cfg.checkpoint_every == 0 or t == cfg.iterations:
                    checkpoint(t, elapsed + time.perf_counter() - t0)
                at_boundary = True
                if on_step is not None:
                    on_step(t)
                if _any(stop["stop"], world):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if at_boundary:  # a consistent state: iteration t is complete
                checkpoint(t, elapsed + time.perf_counter() - t0)
            bar.close()
            raise
    bar.close()
    if lead:
        _write_proposals(files, cfg, problem, learner)
    _barrier(world)
    return last or _last_row(files.metrics)


def _write_proposals(files: _RunFiles, cfg: TrainConfig, problem: Problem, learner: _Learner) -> None:
    """The trained networks alone, on the CPU (a proposals file loads on any machine)."""
    cpu = lambda sd: {k: v.cpu() for k, v in sd.items()}  # noqa: E731
    _atomic_save({"model": cfg.model, "method": cfg.method, "config": problem.config(),
                  "state_dict": cpu(learner.proposals.state_dict()),
                  "model_state_dict": cpu(learner.model.state_dict()), "train": asdict(cfg)}, files.proposals)


def _compiled_loss(sampler: Any, problem: Problem, cfg: TrainConfig, theta: bool,
                   x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """One iteration's loss (eq. 5, plus eq. 6 when theta is learned) as a ``torch.compile``'d function.

    One eager, gradient-free pass over the batch ``x`` first builds what the model caches (its layouts), with the random
    state restored afterwards, so the traced program has none of that Python in it; graph breaks are allowed (a model
    may have some), and ``torch.distributions`` validation is off inside, as the traced code cannot sync.
    """
    from tmcgraph.evaluate.compiled import distribution_validation

    def iteration_loss(x: torch.Tensor) -> torch.Tensor:
        res = run(sampler, x, cfg.num_particles, cfg.num_sweeps, objective=True, scheme=cfg.resampling,
                  learn_model=problem.theta_terms if theta else False)
        loss = phi_loss(res.sweeps)
        return loss + theta_loss(res.sweeps) if theta else loss

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        run(sampler, x, cfg.num_particles, cfg.num_sweeps, scheme=cfg.resampling)
    fn = torch.compile(iteration_loss, dynamic=False)

    def call(x: torch.Tensor) -> torch.Tensor:
        with distribution_validation(False):  # traced code must not sync on argument checks
            return fn(x)

    return call


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _world() -> Tuple[int, int]:
    """(processes, this rank): (1, 0) unless a torch.distributed group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(items: List[Any], world: int) -> List[Any]:
    """Every process's ``items``, concatenated in rank order."""
    if world == 1:
        return items
    import torch.distributed as dist

    out: List[Any] = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _all_reduce_grads(params: List[nn.Parameter]) -> None:
    """Sum the gradients over the processes (each holds its slices' share, already divided by ``streams``)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _average(rows: List[Dict[str, float]], world: int) -> Dict[str, float]:
    """The mean of each metric over this process's slices and over the processes."""
    keys = sorted({k for r in rows for k in r})
    values = torch.tensor([[r.get(k, math.nan) for k in keys] for r in rows], dtype=torch.float64).mean(0)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
        values /= world
    return {k: float(v) for k, v in zip(keys, values)}


def _any(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _last_row(path: str) -> Dict[str, float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in (None, "")} if rows else {}


def _truncate_csv(path: str, iteration: int, fields_: List[str]) -> None:
    """Drop rows logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(fields_)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def _metrics(problem: Problem, proposals: nn.Module, model: nn.Module, x: torch.Tensor, res: Result,
             loss: torch.Tensor, loss_theta: Optional[torch.Tensor], t: int, seconds: float,
             lr: float) -> Dict[str, float]:
    last = res.sweeps[-1]
    out: Dict[str, float] = {"iteration": t, "seconds": round(seconds, 2), "lr": lr, "loss": loss.item(),
                             "log_evidence": last.log_evidence.mean().item(),
                             "log_joint": last.mean_log_joint().mean().item(),
                             "ess_init": res.sweeps[0].ess["init"].mean().item()}
    if loss_theta is not None:
        out["loss_theta"] = loss_theta.item()
    for name, v in last.ess.items():
        if name != "init":
            out[f"ess_{name}"] = v.mean().item()
    out.update(problem.train_metrics(proposals, model, x, res))
    return out
