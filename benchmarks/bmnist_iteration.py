"""One APG training iteration on bouncing MNIST (cpu profile), with eq. 6 recorded per step or per sweep.

The sampler of ``apg.models.bmnist`` (T + 1 blocks) with fresh networks, on videos of the cpu profile
(32x32 canvas, 8x8 scikit-learn digits, D = 3, T = 10): ``run(..., objective=True, learn_model=MODE)``
plus the backward of eq. 5 + eq. 6.  ``learn_model=True`` evaluates the full log joint (T frames) after
each of the T + 1 blocks; ``"sweep"`` after each sweep's last block only.  Timings are interleaved,
medians of ``--repeats``, one thread; the figure reported is the ratio step / sweep, measured in the same run.

    python benchmarks/bmnist_iteration.py --batch 4 --particles 5 --sweeps 3 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apg.models.bmnist import CPU, load_digits, simulate
from apg.models.bmnist.model import DigitDecoder
from apg.models.bmnist.networks import BMNISTProposals
from apg.models.bmnist.sampler import apg_sampler
from apg.objectives import phi_loss, theta_loss
from apg.sampler import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--sweeps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    frames = simulate(args.batch, CPU, load_digits(CPU.digit), seed=0)["frames"]
    nets, dec = BMNISTProposals(CPU, hidden=(64, 64)), DigitDecoder(CPU.digit, (64, 128))
    sampler = apg_sampler(nets, dec, CPU.num_digits, CPU.num_frames)
    g = torch.Generator().manual_seed(0)

    def step(mode):
        res = run(sampler, frames, args.particles, args.sweeps, objective=True, learn_model=mode, generator=g)
        (phi_loss(res.sweeps) + theta_loss(res.sweeps)).backward()

    times = {"step": [], "sweep": []}
    for mode in (True, "sweep"):
        step(mode)  # warm-up
    for _ in range(args.repeats):
        for name, mode in (("step", True), ("sweep", "sweep")):
            t = time.perf_counter()
            step(mode)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch}, L={args.particles}, K={args.sweeps}, T={CPU.num_frames}, D={CPU.num_digits}, "
          f"one thread: eq. 6 per step / per sweep = {med['step'] / med['sweep']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
