"""Bouncing MNIST's data side: IDX files, the spatial transformer, the physics, the simulator."""

from __future__ import annotations

import gzip
import math
import struct

import pytest
import torch

from apg.errors import APGError
from apg.models.bmnist import CPU, BMNISTConfig, crop, load_digits, mnist, place, read_idx, simulate, trajectories


def _write_idx(path, array, gz=False):
    data = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    data += bytes(array.flatten().tolist())
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def _digits(n=5, h=8, seed=0):
    """Generated stand-ins for digit images: two smooth strokes (Gaussian bumps) each, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(h, dtype=torch.float32)
    centres = 1.5 + (h - 3) * torch.rand(n, 2, 2, generator=g)  # (n, bump, (row, col))
    rows = (grid.view(1, 1, h, 1) - centres[..., 0].view(n, 2, 1, 1)) ** 2
    cols = (grid.view(1, 1, 1, h) - centres[..., 1].view(n, 2, 1, 1)) ** 2
    return torch.exp(-(rows + cols) / 2.0).sum(1).clamp(0, 1)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip(tmp_path, gz):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    _write_idx(str(tmp_path / name), images, gz=gz)
    assert torch.equal(read_idx(str(tmp_path / name)), images)
    m = mnist(str(tmp_path))
    assert m.shape == (7, 28, 28) and torch.allclose(m, images.float() / 255)
    resized = load_digits(8, str(tmp_path))
    assert resized.shape == (7, 8, 8) and 0 <= float(resized.min()) and float(resized.max()) <= 1


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(APGError, match="not an IDX file of unsigned bytes"):
        read_idx(str(tmp_path / "bad"))
    _write_idx(str(tmp_path / "short"), torch.zeros(2, 3, dtype=torch.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(APGError, match=r"announces shape \(2, 3\)"):
        read_idx(str(tmp_path / "short"))
    with pytest.raises(APGError, match="none of .* found"):
        mnist(str(tmp_path / "nowhere"))


def test_crop_of_a_placed_digit_returns_the_digit():
    d = _digits(4, 8)
    H = 32
    # whole-pixel offsets o = (H - h)(1 + w)/2: exact
    offsets = torch.tensor([[0, 0], [24, 24], [5, 17], [12, 3]], dtype=torch.float32)
    where = 2 * offsets / (H - 8) - 1
    frames = place(d, where, H)
    for k in range(4):
        ox, oy = offsets[k].long().tolist()
        assert torch.allclose(frames[k, oy:oy + 8, ox:ox + 8], d[k], atol=1e-5)  # x: columns, y: rows
        assert float(frames[k].sum()) == pytest.approx(float(d[k].sum()), abs=1e-4)  # nothing else drawn
    torch.testing.assert_close(crop(frames, where, 8), d, atol=1e-5, rtol=0)
    # sub-pixel positions: within interpolation error, and differentiable in the position
    w = torch.tensor([[0.13, -0.41]], requires_grad=True)
    smooth = torch.ones(1, 8, 8)
    back = crop(place(smooth, w, H), w, 8).detach()
    assert float((back[0, 1:-1, 1:-1] - 1).abs().max()) < 1e-5  # interior of a constant digit
    place(d[:1], w, H).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_bouncing_physics():
    g = torch.Generator().manual_seed(0)
    x = trajectories(500, 60, 0.3, g)
    assert x.shape == (500, 60, 2)
    assert float(x.abs().max()) <= 1 + 1e-12
    step = (x[:, 1:] - x[:, :-1]).abs()
    # away from the borders each step moves exactly delta_t (unit speed)
    free = (x[:, :-1].abs() < 0.6).all(-1) & (x[:, 1:].abs() < 0.6).all(-1)
    assert torch.allclose(step[free].norm(dim=-1), torch.full((int(free.sum()),), 0.3, dtype=torch.float64))
    # a reflection by hand: from 0.9 moving right by 0.3 lands at 0.8 and turns back
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = trajectories(1, 3, 0.3, g)
    v = (y[0, 1] - y[0, 0]) / 0.3
    x2 = y[0, 1] + v * 0.3
    expected = torch.where(x2 > 1, 2 - x2, torch.where(x2 < -1, -2 - x2, x2))
    assert torch.allclose(y[0, 2], expected)
    # per axis, |velocity| is constant: speed magnitude is 1 at every step
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-9)


def test_simulator_is_seeded_and_renders_the_digits():
    d = _digits(6, 8)
    cfg = BMNISTConfig(canvas=32, digit=8, num_digits=2, num_frames=5)
    a = simulate(3, cfg, d, seed=4)
    assert a["frames"].shape == (3, 5, 32, 32) and a["where"].shape == (3, 2, 5, 2) and a["index"].shape == (3, 2)
    assert torch.equal(a["frames"], simulate(3, cfg, d, seed=4)["frames"])
    assert not torch.equal(a["frames"], simulate(3, cfg, d, seed=5)["frames"])
    assert 0 <= float(a["frames"].min()) and float(a["frames"].max()) <= 1
    # a one-digit video is its digit cropped back at every frame
    one = simulate(2, cfg, d, seed=1, num_digits=1, num_frames=4)
    back = crop(one["frames"], one["where"][:, 0], 8)
    target = d[one["index"][:, 0]].unsqueeze(1).expand_as(back)
    right = float((back - target).abs().mean())
    wrong = float((back - target.roll(1, 0)).abs().mean())  # another digit's image: the check has power
    assert right < 0.05 and right < 0.5 * wrong, (right, wrong)  # bilinear twice at sub-pixel positions
    with pytest.raises(APGError, match=r"digits must be \(n, 8, 8\)"):
        simulate(1, cfg, torch.zeros(3, 28, 28))


def test_videos_render_on_demand_as_the_simulator():
    from apg.models.bmnist import Videos

    d = _digits(6, 8)
    cfg = BMNISTConfig(canvas=32, digit=8, num_digits=2, num_frames=5)
    full = simulate(7, cfg, d, seed=2)
    videos = Videos(1000, cfg, d, seed=2)
    assert len(videos) == 1000
    idx = torch.tensor([3, 0, 6])
    assert torch.equal(videos[idx], full["frames"][idx])  # video i depends on (seed, i) alone
    assert torch.equal(simulate(3, cfg, d, seed=2)["frames"], full["frames"][:3])
    assert videos.to("cpu")[idx].device.type == "cpu"
    with pytest.raises(APGError, match=r"video index out of range \[0, 1000\)"):
        videos[torch.tensor([1000])]


def test_cpu_profile_with_sklearn_digits():
    pytest.importorskip("sklearn")
    d = load_digits(CPU.digit)
    assert d.shape == (1797, 8, 8) and float(d.max()) == 1.0
    assert simulate(2, CPU, d, seed=0)["frames"].shape == (2, 10, 32, 32)


# -- the declared model --------------------------------------------------------------------------
def test_declared_model_equals_the_hand_written_density_and_has_local_blankets():
    from apg.models.bmnist.model import BMNISTDensity, DigitDecoder, log_joint

    torch.manual_seed(0)
    cfg = BMNISTConfig(canvas=16, digit=6, num_digits=2, num_frames=4)
    dec = DigitDecoder(6, hidden=(16, 24)).double()
    data = simulate(2, cfg, _digits(5, 6), seed=3)
    frames = data["frames"].double()
    L = 3
    state = {"what": torch.randn(2, L, 2, 10, dtype=torch.float64),
             "where": (data["where"].double().unsqueeze(1) + 0.1 * torch.randn(2, L, 2, 4, 2, dtype=torch.float64))}
    dens = BMNISTDensity(cfg, dec)
    ref = log_joint(frames.unsqueeze(1), state["what"], state["where"], dec, cfg.canvas)
    torch.testing.assert_close(dens.log_joint(frames, state), ref)
    # the blanket of a position is its frame and its neighbours' steps: a change elsewhere leaves it alone
    jd = dens.density(4, 2, frames)
    assert set(jd.blanket(["where_2"])) == {"where_2", "where_3", "x_2"}
    assert set(jd.blanket(["what"])) == {"what", "x_1", "x_2", "x_3", "x_4"}
    moved = {**state, "where": state["where"].clone()}
    moved["where"][..., 3, :] += 0.5  # where_4: outside where_2's blanket
    torch.testing.assert_close(dens.blanket(frames, moved, "where_2"), dens.blanket(frames, state, "where_2"))
    # gradients reach the decoder (eq. 6)
    dens.log_joint(frames, state).sum().backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_place_and_crop_equal_grid_sample_on_affine_grid():
    """The separable interpolation is grid_sample's bilinear interpolation (zeros padding,
    align_corners=False) on affine_grid's grid, values and gradients; a transform with the wrong sign of the
    shift does not match."""
    from torch.nn.functional import affine_grid, grid_sample

    from apg.models.bmnist.simulate import _transform

    def reference(images, where, out, scale, shift):
        n = where.shape[0]
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift * where
        grid = affine_grid(theta, [n, 1, out, out], align_corners=False)
        return grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False).squeeze(1)

    g = torch.Generator().manual_seed(0)
    where = (torch.rand(6, 2, dtype=torch.float64, generator=g) * 2.4 - 1.2).requires_grad_()  # some off canvas
    digits = torch.rand(6, 8, 8, dtype=torch.float64, generator=g).requires_grad_()
    frames = torch.rand(6, 32, 32, dtype=torch.float64, generator=g).requires_grad_()
    for images, out, scale, shift in ((digits, 32, 32 / 8, -(32 - 8) / 8), (frames, 8, 8 / 32, (32 - 8) / 32)):
        ours, ref = _transform(images, where, out, scale, shift), reference(images, where, out, scale, shift)
        torch.testing.assert_close(ours, ref)
        weight = torch.rand(ref.shape, dtype=torch.float64, generator=g)
        ga = torch.autograd.grad((ours * weight).sum(), (images, where))
        gb = torch.autograd.grad((ref * weight).sum(), (images, where))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
        wrong = _transform(images, where, out, scale, -shift)
        assert (wrong - ref).abs().max() > 0.1
