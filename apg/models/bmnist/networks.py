"""Bouncing MNIST's proposals (after appendix E of Wu et al., ICML 2020).

* ``q(where_t | x_t, what)``: digit by digit, the frame's residual (the frame minus
  the digits already placed) is correlated with the digit's decoded image at
  every whole-pixel position (``conv2d``); a softmax over the positions gives a
  map, and a network of the map gives a Normal over the position.  The digit is
  then placed at the drawn position and subtracted before the next digit is
  found ("digits found one at a time", as in the official code).  Two networks
  (``where_net``):

  - ``"soft-argmax"`` (ours): the map is the correlation divided by the digit's
    squared norm, times a learned sharpness; the Normal's mean is the map's
    soft-argmax plus a correction by an MLP of the map (FC ``hidden[1]`` tanh),
    which also gives the scale.  It starts at the soft-argmax, so it tracks from
    the first iteration.
  - ``"paper"`` (appendix E): the softmax of the raw correlation, FC
    ``hidden[0]`` tanh, then two heads of FC ``hidden[1]`` tanh: the mean through
    a final FC 2 tanh (positions lie in [-1, 1]) and the log-scale through a
    linear FC 2 (the appendix lists tanh for both outputs; a tanh log-scale
    would keep every scale above 1/e of the canvas, so the official code's
    linear log-scale head is used).  With the paper profile's hidden sizes
    (400, 200) this is FC 400 + two FC 200 heads.
* ``q(what | x, where)``: each frame cropped at each digit's position
  (spatial transformer), an MLP per crop (FC ReLU, FC ReLU) to a Normal's mean
  and log-scale, averaged over the frames (the neural sufficient statistic).
* The one-shot proposal runs the position kernel with a fixed template (the mean
  training digit, as in the official code) in place of the decoded digits,
  frame by frame, then the ``what`` kernel.

Shapes: frames ``(*B, T, H, H)``; state ``what (*B, L, D, 10)``, ``where (*B, L, D, T, 2)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .model import WHAT_DIM, DigitDecoder
from .simulate import BMNISTConfig, crop, place

__all__ = ["BMNISTProposals", "WHERE_NETS", "correlate"]

#: the position kernel's networks (see the module docstring)
WHERE_NETS = ("soft-argmax", "paper")


def correlate(frames: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of each frame ``(..., H, H)`` with its digit ``(..., h, h)`` at every whole-pixel offset.

    ``(..., P, P)`` with ``P = H - h + 1`` (offset ``(row, col)``). One digit ``(h, h)`` for all frames is one
    convolution kernel (not one group per frame).
    """
    H, h = frames.shape[-1], digits.shape[-1]
    if digits.dim() == 2:
        out = nn.functional.conv2d(frames.reshape(-1, 1, H, H), digits.reshape(1, 1, h, h))
        return out.reshape(frames.shape[:-2] + out.shape[-2:])
    lead = torch.broadcast_shapes(frames.shape[:-2], digits.shape[:-2])
    f = frames.expand(lead + frames.shape[-2:]).reshape(1, -1, H, H)
    k = digits.expand(lead + digits.shape[-2:]).reshape(-1, 1, h, h)
    out = nn.functional.conv2d(f, k, groups=k.shape[0])  # (1, N, P, P)
    return out.reshape(lead + out.shape[-2:])


class BMNISTProposals(nn.Module):
    """The proposals (see the module docstring).

    Args:
        cfg: the profile (canvas and digit sizes).
        hidden: hidden units of the crop MLP's two layers and of the position network (``"soft-argmax"``:
            ``hidden[1]``; ``"paper"``: ``hidden[0]``, then ``hidden[1]`` per head).
        where_net: ``"soft-argmax"`` or ``"paper"`` (see the module docstring).
    """

    def __init__(self, cfg: BMNISTConfig, hidden: Tuple[int, int] = (400, 200), where_net: str = "soft-argmax") -> None:
        super().__init__()
        if where_net not in WHERE_NETS:
            raise ValueError(f"where_net must be one of {list(WHERE_NETS)}, got {where_net!r}")
        self.cfg = cfg
        self.where_kind = where_net
        P = cfg.canvas - cfg.digit + 1
        self.positions = P
        grid = torch.linspace(-1.0, 1.0, P) if P > 1 else torch.zeros(1)
        self.grid: torch.Tensor
        self.register_buffer("grid", grid, persistent=False)
        if where_net == "soft-argmax":
            self.sharpness = nn.Parameter(torch.tensor(4.0))  # softmax temperature of the correlation map
            last = nn.Linear(hidden[1], 4)
            nn.init.zeros_(last.weight)  # starts at the soft-argmax of the correlation map
            nn.init.zeros_(last.bias)
            self.where_net = nn.Sequential(nn.Linear(P * P, hidden[1]), nn.Tanh(), last)
        else:
            self.where_net = nn.Sequential(nn.Linear(P * P, hidden[0]), nn.Tanh())
            self.where_loc = nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.Tanh(), nn.Linear(hidden[1], 2),
                                           nn.Tanh())
            self.where_log_scale = nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.Tanh(), nn.Linear(hidden[1], 2))
        h = cfg.digit
        self.what_net = nn.Sequential(nn.Linear(h * h, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                      nn.ReLU(), nn.Linear(hidden[1], 2 * WHAT_DIM))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
        # the one-shot's digit stand-in (the official code's: the mean training digit, see set_template)
        self.template: torch.Tensor
        self.register_buffer("template", torch.exp(-(xx ** 2 + yy ** 2) / 0.5))

    def set_template(self, digits: torch.Tensor) -> None:
        """Make the one-shot proposal's template the mean of ``digits (n, h, h)`` (a fixed buffer)."""
        if digits.shape[-2:] != self.template.shape:
            raise ValueError(f"template digits must be (n, {self.cfg.digit}, {self.cfg.digit}), got "
                             f"{tuple(digits.shape)}")
        self.template.copy_(digits.mean(0).to(self.template))

    # -- positions -----------------------------------------------------------------------------
    def where_params(self, residual: torch.Tensor, digit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One digit in one frame.

        ``residual (..., H, H)``, ``digit (..., h, h)`` -> Normal ``loc, scale (..., 2)`` over its position ``(x, y)``.
        """
        corr = correlate(residual, digit)  # (..., P, P): rows are y, columns x
        if self.where_kind == "paper":
            h = self.where_net(torch.softmax(corr.flatten(-2), -1))
            return self.where_loc(h), self.where_log_scale(h).exp()
        norm = digit.flatten(-2).pow(2).sum(-1).clamp_min(1e-6)  # scale-free map: correlation / |digit|^2
        logits = self.sharpness * corr / norm.unsqueeze(-1).unsqueeze(-1) * self.positions
        m = torch.softmax(logits.flatten(-2), -1)  # (..., P*P)
        m = m.masked_fill(m < 1e-20, 0.0)  # no subnormal floats into the MLP (they slow CPU matmuls ~6x)
        probs = m.reshape(corr.shape)
        soft = torch.stack([(probs.sum(-2) * self.grid).sum(-1), (probs.sum(-1) * self.grid).sum(-1)], -1)
        out = self.where_net(m)
        loc = soft + out[..., :2]
        scale = nn.functional.softplus(out[..., 2:] - 2.0) + 1e-3
        return loc, scale

    # -- digits --------------------------------------------------------------------------------
    def what_params(self, frames: torch.Tensor, where: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``frames (*B, T, H, H)``, ``where (*B, L, D, T, 2)`` -> Normal ``loc, scale (*B, L, D, 10)``.

        The crops' MLP outputs averaged over the T frames.
        """
        f = frames.unsqueeze(-4).unsqueeze(-4)  # (*B, 1, 1, T, H, H)
        crops = crop(f, where, self.cfg.digit)  # (*B, L, D, T, h, h)
        out = self.what_net(crops.flatten(-2)).mean(-2)  # (*B, L, D, 20)
        return out[..., :WHAT_DIM], out[..., WHAT_DIM:].exp()


class WhereKernel:
    """``q(where_t | x_t, what)`` for frame ``t``, digits found one at a time; densities ``(*B, L)``.

    ``frame (*B, 1, H, H)``: frame ``t``; ``digits (*B, L, D, h, h)``: the decoded digit images (or
    ``(D, h, h)``: the one-shot's template for every particle).  ``sample`` returns
    the whole ``where (*B, L, D, T, 2)`` with frame ``t`` replaced (``base`` supplies the other frames).
    """

    def __init__(self, nets: BMNISTProposals, frame: torch.Tensor, digits: torch.Tensor, t: int,
                 base: Optional[torch.Tensor], num_frames: int) -> None:
        self.nets, self.frame, self.digits, self.t, self.base, self.T = nets, frame, digits, t, base, num_frames

    def _walk(self, values: Optional[torch.Tensor], generator: Optional[torch.Generator]):
        """Digit by digit: (positions (*B, L, D, 2), log q (*B, L)); draws when ``values`` is None."""
        canvas = self.nets.cfg.canvas
        if values is not None:
            lead = values.shape[:-2]
        elif self.base is not None:
            lead = self.base.shape[:-3]
        else:
            raise ValueError("WhereKernel.sample needs the other frames' positions (base)")
        residual = self.frame.expand(lead + self.frame.shape[-2:])  # frame: (*B, 1, H, H)
        chosen, lq = [], torch.zeros((), dtype=self.frame.dtype, device=self.frame.device)
        for d in range(self.digits.shape[-3]):
            digit = self.digits[..., d, :, :]
            loc, scale = self.nets.where_params(residual, digit)
            if values is None:
                with torch.no_grad():
                    w = torch.normal(loc.detach(), scale.detach(), generator=generator)
            else:
                w = values[..., d, :]
            lq = lq + (-0.5 * ((w - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
            with torch.no_grad():
                residual = residual - place(digit.detach(), w, canvas)
            chosen.append(w)
        return torch.stack(chosen, -2), lq

    def sample(self, generator: Optional[torch.Generator] = None):
        """Draw frame ``t``'s positions.

        The walk's density of the draw is kept (with autograd when it is enabled) and returned by `log_prob` of the same
        values, so drawing and scoring cost one walk.
        """
        if self.base is None:
            raise ValueError("WhereKernel.sample needs the other frames' positions (base)")
        w, lq = self._walk(None, generator)
        where = self.base.clone()
        where[..., self.t, :] = w.detach()
        self._drawn = (where, lq)
        return {"where": where}

    def log_prob(self, values) -> torch.Tensor:
        where = values["where"]
        drawn = getattr(self, "_drawn", None)
        if drawn is not None and _same(where, drawn[0]) and (drawn[1].requires_grad or not torch.is_grad_enabled()):
            return drawn[1]
        return self._walk(where[..., self.t, :], None)[1]


class WhatKernel:
    """``q(what | x, where)``; densities ``(*B, L)``."""

    def __init__(self, nets: BMNISTProposals, frames: torch.Tensor, where: torch.Tensor) -> None:
        self.loc, self.scale = nets.what_params(frames, where)

    def sample(self, generator: Optional[torch.Generator] = None):
        with torch.no_grad():
            return {"what": torch.normal(self.loc.detach(), self.scale.detach(), generator=generator)}

    def log_prob(self, values) -> torch.Tensor:
        z = (values["what"] - self.loc) / self.scale
        return (-0.5 * z * z - self.scale.log() - 0.5 * math.log(2 * math.pi)).sum((-2, -1))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b`` or a view of the same memory with the same layout and version (e.g. ``b.detach()``)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a._version == b._version)


def decoded(decoder: DigitDecoder, what: torch.Tensor) -> torch.Tensor:
    """The digits' images ``(*B, L, D, h, h)`` from ``what`` (detached: the kernels read the decoder)."""
    with torch.no_grad():
        return decoder(what)
