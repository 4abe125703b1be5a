"""One APG training iteration on bouncing MNIST: eq. 6 per step against per sweep, and the paper's profile
against the cpu profile.

The iteration is what ``apg train bmnist`` runs: ``run(..., objective=True, learn_model=MODE)`` on a batch of
training videos, then the backward of eq. 5 + eq. 6, with the networks of ``apg.models.bmnist.problem``.

* ``--compare eq6`` (cpu profile: 32x32 canvas, 8x8 scikit-learn digits, D = 3, T = 10): ``learn_model=True``
  evaluates the full log joint (T frames) after each of the T + 1 blocks; ``"sweep"`` after each sweep's last
  block only.  Reported: the ratio step / sweep.
* ``--compare profiles``: the cpu profile with the shipped checkpoint's settings (batch 5, L = 10, K = 3)
  against the paper's (96x96 canvas, 28x28 digits, the paper's hidden sizes, batch 10, L = 10, K = 5; the
  digits are scikit-learn's resized to 28x28, which costs the same as MNIST).  Reported: the ratio
  paper / cpu, and the hours 200,000 paper iterations would take at the measured rate.

Timings are interleaved, medians of ``--repeats``, one thread.

    python benchmarks/bmnist_iteration.py --compare eq6 profiles --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch

from apg.models.bmnist import PAPER
from apg.models.bmnist.problem import BMNISTProblem, BMNISTSettings
from apg.objectives import phi_loss, theta_loss
from apg.sampler import run


def _iteration(problem: BMNISTProblem, batch: int, L: int, K: int, mode) -> Callable[[], None]:
    torch.manual_seed(0)
    nets, dec = problem.make_proposals("apg"), problem.make_model()
    sampler = problem.sampler(nets, dec)
    frames = problem.training_data(1000, 0)[torch.arange(batch)]
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        res = run(sampler, frames, L, K, objective=True, learn_model=mode, generator=g)
        (phi_loss(res.sweeps) + theta_loss(res.sweeps)).backward()

    return step


def _interleaved(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    for step in steps.values():
        step()  # warm-up
    times: Dict[str, list] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", nargs="+", choices=["eq6", "profiles"], default=["eq6", "profiles"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpu = BMNISTProblem()
    if "eq6" in args.compare:
        med = _interleaved({"step": _iteration(cpu, 5, 10, 3, True), "sweep": _iteration(cpu, 5, 10, 3, "sweep")},
                           args.repeats)
        print(f"cpu profile, batch 5, L=10, K=3, one thread: eq. 6 per step / per sweep = "
              f"{med['step'] / med['sweep']:.2f}x")
    if "profiles" in args.compare:
        paper = BMNISTProblem(BMNISTSettings(profile=PAPER, proposal_hidden=(400, 200), decoder_hidden=(200, 400)))
        med = _interleaved({"cpu": _iteration(cpu, 5, 10, 3, "sweep"), "paper": _iteration(paper, 10, 10, 5, "sweep")},
                           args.repeats)
        print(f"one thread: paper profile (batch 10, L=10, K=5) / cpu profile (batch 5, L=10, K=3) = "
              f"{med['paper'] / med['cpu']:.1f}x; 200,000 paper iterations at this rate: "
              f"{200_000 * med['paper'] / 3600:.0f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
