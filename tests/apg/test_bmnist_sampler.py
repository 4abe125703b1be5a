"""Bouncing MNIST's proposals and sampler: geometry of the position kernel, whole trajectories, gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from apg.models.bmnist import BMNISTConfig, simulate
from apg.models.bmnist.model import DigitDecoder
from apg.models.bmnist.networks import BMNISTProposals, WhereKernel, correlate
from apg.models.bmnist.sampler import apg_sampler
from apg.objectives import phi_loss, theta_loss
from apg.sampler import init, run, sweep

sys.path.insert(0, str(Path(__file__).parent))
from test_bmnist_data import _digits  # noqa: E402

CFG = BMNISTConfig(canvas=20, digit=6, num_digits=2, num_frames=4)


def test_correlation_peaks_at_the_digits_offset():
    d = _digits(1, 6)[0]
    frame = torch.zeros(20, 20)
    frame[9:15, 3:9] = d  # rows 9.., columns 3..
    corr = correlate(frame, d)
    assert corr.shape == (15, 15)
    assert divmod(int(corr.argmax()), 15) == (9, 3)  # (row, column) offset


def test_position_kernel_finds_an_isolated_digit_at_initialisation():
    """The fresh kernel's mean is the soft-argmax of the correlation map: with the true digit image it
    lands on the digit, in the simulator's (x, y) convention."""
    torch.manual_seed(0)
    digits = _digits(5, 6)
    data = simulate(6, BMNISTConfig(canvas=20, digit=6, num_digits=1, num_frames=3), digits, seed=3)
    nets = BMNISTProposals(CFG, hidden=(16, 16))
    for t in range(3):
        frame = data["frames"][:, t]
        loc, scale = nets.where_params(frame, digits[data["index"][:, 0]])
        err = (loc.detach() - data["where"][:, 0, t]).abs().max()
        assert float(err) < 0.1, (t, float(err))
        assert (scale > 0).all()


def test_sampler_runs_keeps_trajectories_whole_and_trains_both_parameter_sets():
    torch.manual_seed(0)
    data = simulate(3, CFG, _digits(5, 6), seed=1)
    nets, dec = BMNISTProposals(CFG, hidden=(16, 16)), DigitDecoder(6, (16, 32))
    sampler = apg_sampler(nets, dec, 2, 4)
    g = torch.Generator().manual_seed(0)
    particles, _ = init(sampler, data["frames"], 6, generator=g)
    assert particles.values["where"].shape == (3, 6, 2, 4, 2) and particles.values["what"].shape == (3, 6, 2, 10)
    # one position block: resampling re-indexes the whole state, the block changes frame 2 only
    new, info = sweep(sampler, data["frames"], particles, blocks=[sampler.blocks[2]], generator=g)
    assert torch.isfinite(new.log_weights).all() and set(info.ess) == {"where_3"}
    old_what, old_where = particles.values["what"], particles.values["where"]
    for b in range(3):
        for p in range(6):
            same = [k for k in range(6) if torch.equal(old_what[b, k], new.values["what"][b, p])
                    and torch.equal(torch.cat([old_where[b, k, :, :2], old_where[b, k, :, 3:]], 1),
                                    torch.cat([new.values["where"][b, p, :, :2], new.values["where"][b, p, :, 3:]], 1))]
            assert same, (b, p)  # an old particle, whole, except the updated frame
    assert not torch.equal(new.values["where"][..., 2, :], old_where[..., 2, :])
    # eq. 5 and eq. 6 reach every parameter
    res = run(sampler, data["frames"], 4, 2, objective=True, learn_model=True, generator=g)
    (phi_loss(res.sweeps) + theta_loss(res.sweeps)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nets.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())


def test_where_kernel_density_matches_its_draws():
    """log_prob at the drawn values equals the density the walk used to draw them (same residual path)."""
    torch.manual_seed(0)
    data = simulate(2, CFG, _digits(5, 6), seed=2)
    nets = BMNISTProposals(CFG, hidden=(16, 16))
    digits = _digits(2, 6).expand(2, 3, 2, 6, 6)
    base = torch.zeros(2, 3, 2, 4, 2)
    k = WhereKernel(nets, data["frames"][:, 1].unsqueeze(-3), digits, 1, base, 4)
    drawn = k.sample(torch.Generator().manual_seed(1))["where"]
    w, lq = k._walk(drawn[..., 1, :], None)
    torch.testing.assert_close(w, drawn[..., 1, :])
    torch.testing.assert_close(k.log_prob({"where": drawn}), lq)
    assert torch.equal(drawn[..., [0, 2, 3], :], base[..., [0, 2, 3], :])
