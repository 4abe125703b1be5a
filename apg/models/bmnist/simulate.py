"""Bouncing digits (Wu et al., ICML 2020, section 5.5): the spatial transformer, the physics and the simulator.

Coordinates: a digit's position ``where = (x, y)`` lies in ``[-1, 1]^2``; ``x`` is
horizontal (columns, -1 = left), ``y`` vertical (rows, -1 = top).  A digit of
``h x h`` pixels at ``where`` covers the canvas pixels from offset
``o = (H - h) (1 + where) / 2`` on, so ``-1`` and ``1`` put it flush with the
borders.  `place` and `crop` (the numbers of bilinear ``grid_sample`` on
``affine_grid``'s grid, computed as two interpolation matrices) use this one convention on both axes
(the official code flips the x axis in one direction and the y axis in the
other); a crop of a placed digit returns the digit exactly when the offset is a
whole number of pixels, and within interpolation error otherwise.

Physics (the official simulator's): each digit starts uniformly in
``[-1, 1]^2`` and moves with unit speed in a uniformly random direction,
``delta_t = 0.3`` per frame, reflecting off the borders.  Frames are the sum of
the placed digits, clamped to ``[0, 1]``, rendered on the fly from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ...errors import APGError

__all__ = ["BMNISTConfig", "CPU", "PAPER", "PROFILES", "Videos", "crop", "place", "render", "simulate",
           "trajectories"]


@dataclass(frozen=True)
class BMNISTConfig:
    """A simulation profile.

    Attributes:
        canvas: frame size H (pixels, square).
        digit: digit size h (pixels, square).
        num_digits: D digits per video.
        num_frames: T frames per video.
        delta_t: displacement per frame (unit speed).
    """

    canvas: int = 96
    digit: int = 28
    num_digits: int = 3
    num_frames: int = 10
    delta_t: float = 0.3

    def __post_init__(self) -> None:
        if not (0 < self.digit <= self.canvas):
            raise APGError(f"the digit size must be in (0, canvas={self.canvas}], got {self.digit}")
        if self.num_digits < 1 or self.num_frames < 1:
            raise APGError(f"num_digits and num_frames must be >= 1, got {self.num_digits} and {self.num_frames}")
        if not (0 < self.delta_t < 2):
            raise APGError(f"delta_t must be in (0, 2) (one reflection per frame at most), got {self.delta_t}")


#: the paper's profile: 96x96 canvas, 28x28 MNIST digits, D=3, T=10
PAPER = BMNISTConfig()
#: a CPU profile: 32x32 canvas, 8x8 digits (scikit-learn's, no resizing), D=3, T=10
CPU = BMNISTConfig(canvas=32, digit=8)
PROFILES = {"paper": PAPER, "cpu": CPU}


def _weights(coords: torch.Tensor, out_size: int, in_size: int, scale: float, shift: float) -> torch.Tensor:
    """Bilinear interpolation weights ``(..., out_size, in_size)`` along one axis for ``coords (...)``.

    Output pixel ``u`` (normalised centre ``c_u = (2u + 1) / out_size - 1``) samples the input at the
    normalised coordinate ``g = scale c_u + shift coord``, i.e. at pixel ``i* = ((g + 1) in_size - 1) / 2``
    (``grid_sample``'s ``align_corners=False``); input pixel ``i`` gets the weight ``max(0, 1 - |i* - i|)``,
    and pixels outside the input contribute zero (``padding_mode="zeros"``).
    """
    # i* - i = a_u + b coord - i with a_u = ((scale c_u + 1) in - 1) / 2 and b = shift in / 2
    c = (2 * torch.arange(out_size, dtype=coords.dtype, device=coords.device) + 1) / out_size - 1
    i = torch.arange(in_size, dtype=coords.dtype, device=coords.device)
    offset = ((scale * c + 1) * in_size - 1) / 2  # (out,)
    base = offset.view(-1, 1) - i.view(1, -1)  # (out, in)
    d = torch.addcmul(base, coords.unsqueeze(-1).unsqueeze(-1), torch.tensor(shift * in_size / 2, dtype=coords.dtype,
                                                                             device=coords.device))
    return (1 - d.abs()).clamp_min_(0)


def _transform(images: torch.Tensor, where: torch.Tensor, out_size: int, scale: float,
               shift: float) -> torch.Tensor:
    """Bilinear ``grid_sample`` of images on the grid of a translation and a fixed scale.

    Of ``images (..., n, n)`` on the axis-aligned grid of a translation by ``shift * where`` and a fixed ``scale``,
    ``(..., out, out)``.

    Such a grid is separable, so the bilinear interpolation is a product of two interpolation matrices:
    ``W_y @ image @ W_x^T`` (rows from ``y = where[..., 1]``, columns from ``x = where[..., 0]``), the same
    numbers as ``grid_sample`` on ``affine_grid``'s grid with a cheaper forward and backward (batched matrix
    products instead of a gathered grid).
    """
    n = images.shape[-1]
    w = _weights(where, out_size, n, scale, shift)  # (..., 2, out, n): x then y
    return w[..., 1, :, :] @ images @ w[..., 0, :, :].transpose(-1, -2)


def place(digits: torch.Tensor, where: torch.Tensor, canvas: int) -> torch.Tensor:
    """Digits ``(..., h, h)`` placed at ``where (..., 2)`` on empty canvases: ``(..., H, H)`` (bilinear).

    Differentiable in ``digits`` and ``where``; leading dims broadcast.
    """
    h = digits.shape[-1]
    # canvas pixel u (normalised) samples the digit at (H/h) u - where (H - h)/h
    return _transform(digits, where, canvas, canvas / h, -(canvas - h) / h)


def crop(frames: torch.Tensor, where: torch.Tensor, size: int) -> torch.Tensor:
    """Windows of ``size x size`` cut from frames ``(..., H, H)`` at ``where (..., 2)``: ``(..., size, size)``.

    The inverse of `place` (same convention); leading dims broadcast.
    """
    H = frames.shape[-1]
    # digit pixel v (normalised) samples the canvas at (h/H) v + where (H - h)/H
    return _transform(frames, where, size, size / H, (H - size) / H)


def trajectories(num: int, num_frames: int, delta_t: float = 0.3,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Positions ``(num, T, 2)`` of bouncing points.

    Uniform start in ``[-1, 1]^2``, unit speed in a uniform direction, ``delta_t`` per frame, reflected at the borders
    (float64).
    """
    x = torch.rand(num, 2, generator=generator, dtype=torch.float64) * 2 - 1
    angle = torch.rand(num, generator=generator, dtype=torch.float64) * 2 * math.pi
    v = torch.stack([angle.cos(), angle.sin()], -1)
    out = [x]
    for _ in range(num_frames - 1):
        x = x + v * delta_t
        low, high = x < -1, x > 1
        x = torch.where(low, -2 - x, torch.where(high, 2 - x, x))  # -1 + |-1 - x| and 1 - |x - 1|
        v = torch.where(low | high, -v, v)
        out.append(x)
    return torch.stack(out, 1)


def render(digits: torch.Tensor, where: torch.Tensor, canvas: int) -> torch.Tensor:
    """Frames from digits ``(..., D, h, h)`` and positions ``(..., D, T, 2)``.

    The placed digits summed over D and clamped to ``[0, 1]``, ``(..., T, H, H)``.
    """
    placed = place(digits.unsqueeze(-3), where, canvas)  # (..., D, T, H, H)
    return placed.sum(-4).clamp(0.0, 1.0)


def _check_digits(cfg: BMNISTConfig, digits: torch.Tensor) -> None:
    if digits.dim() != 3 or digits.shape[-1] != cfg.digit or digits.shape[-2] != cfg.digit:
        raise APGError(f"digits must be (n, {cfg.digit}, {cfg.digit}) for this profile, got {tuple(digits.shape)}")


def _draw(num_images: int, seed: int, video: int, D: int, T: int, delta_t: float):
    """Video ``video``'s digit choices ``(D,)`` and positions ``(D, T, 2)``, from its own generator."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + video)
    index = torch.randint(num_images, (D,), generator=g)
    return index, trajectories(D, T, delta_t, g).float()


def simulate(num_videos: int, cfg: BMNISTConfig, digits: torch.Tensor, *, seed: int = 0,
             num_digits: Optional[int] = None, num_frames: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Videos of bouncing digits (float32).

    Video ``i`` is a function of ``(seed, i)`` and ``digits`` alone, so the first videos of a larger set are the same
    (see `Videos`).

    Args:
        num_videos: B.
        cfg: the profile (canvas and digit sizes, default D and T, delta_t).
        digits: the digit images to draw from, ``(n, h, h)`` with ``h = cfg.digit``.
        seed: the seed.
        num_digits: D (default: the profile's).
        num_frames: T (default: the profile's).

    Returns:
        ``{"frames": (B, T, H, H), "where": (B, D, T, 2), "index": (B, D) (the digits' images)}``.
    """
    D = cfg.num_digits if num_digits is None else num_digits
    T = cfg.num_frames if num_frames is None else num_frames
    _check_digits(cfg, digits)
    drawn = [_draw(digits.shape[0], seed, i, D, T, cfg.delta_t) for i in range(num_videos)]
    index = torch.stack([i for i, _ in drawn])
    where = torch.stack([w for _, w in drawn])
    return {"frames": render(digits[index], where, cfg.canvas), "where": where, "index": index}


class Videos:
    """A training set of ``num_videos`` videos rendered on demand (never stored).

    ``videos[idx]`` with an int64 tensor ``idx (k,)`` gives frames ``(k, T, H, H)``, the same as
    ``simulate(...)["frames"][idx]``.

    Works as ``apg.train``'s data: indexing by a batch of indices, ``len``, and ``.to(device)``.
    """

    def __init__(self, num_videos: int, cfg: BMNISTConfig, digits: torch.Tensor, *, seed: int = 0,
                 num_digits: Optional[int] = None, num_frames: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        _check_digits(cfg, digits)
        self.num_videos, self.cfg, self.digits, self.seed = num_videos, cfg, digits, seed
        self.D = cfg.num_digits if num_digits is None else num_digits
        self.T = cfg.num_frames if num_frames is None else num_frames
        self.device = device

    def __len__(self) -> int:
        return self.num_videos

    def to(self, device) -> "Videos":
        """The same videos, rendered on ``device``."""
        return Videos(self.num_videos, self.cfg, self.digits, seed=self.seed, num_digits=self.D,
                      num_frames=self.T, device=torch.device(device))

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_videos):
            raise APGError(f"video index out of range [0, {self.num_videos}): {idx.tolist()}")
        drawn = [_draw(self.digits.shape[0], self.seed, int(i), self.D, self.T, self.cfg.delta_t) for i in idx]
        index = torch.stack([i for i, _ in drawn])
        where = torch.stack([w for _, w in drawn])
        digits, where = self.digits[index], where
        if self.device is not None:
            digits, where = digits.to(self.device), where.to(self.device)
        return render(digits, where, self.cfg.canvas)
