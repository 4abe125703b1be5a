"""Bouncing MNIST's APG sampler: T + 1 blocks, ``where_1 .. where_T`` then ``what``.

Each position block ``where_t`` is weighed by its Markov blanket ``{where_t,
where_{t+1}, x_t}`` from the compiled model (one frame), so a sweep costs O(T)
frame evaluations; ``what`` by every frame.  Resampling (before every block)
re-indexes the whole state, so a particle's trajectory stays whole.

Data: frames ``(*B, T, H, H)``; state ``what (*B, L, D, 10)``, ``where (*B, L, D, T, 2)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...sampler import Block, Sampler
from .model import BMNISTDensity, DigitDecoder
from .networks import BMNISTProposals, WhatKernel, WhereKernel, decoded

__all__ = ["apg_sampler"]


def apg_sampler(nets: BMNISTProposals, decoder: DigitDecoder, num_digits: int,
                num_frames: int, sweeps_blocks: bool = True) -> Sampler:
    """The sampler for videos of ``num_frames`` frames and ``num_digits`` digits.

    (the RWS baseline: ``sweeps_blocks=False``, the one-shot proposal alone).
    """
    dens = BMNISTDensity(nets.cfg, decoder)
    D, T = num_digits, num_frames

    def init(frames: torch.Tensor, L: int, generator: Optional[torch.Generator] = None):
        batch = frames.shape[:-3]
        template = nets.template.to(frames.dtype).expand((D,) + nets.template.shape)
        where = torch.zeros(batch + (L, D, T, 2), dtype=frames.dtype, device=frames.device)
        lq = torch.zeros(batch + (L,), dtype=frames.dtype, device=frames.device)
        for t in range(T):
            frame = frames[..., t, :, :].unsqueeze(-3)  # (*B, 1, H, H)
            k = WhereKernel(nets, frame, template, t, where, T)
            where = k.sample(generator)["where"]
            lq = lq + k.log_prob({"where": where})
        k_what = WhatKernel(nets, frames, where)
        what = k_what.sample(generator)
        return {"what": what["what"], "where": where}, lq + k_what.log_prob(what)

    def where_block(t: int) -> Block:
        def kernel(frames, s):
            return WhereKernel(nets, frames[..., t, :, :].unsqueeze(-3), decoded(decoder, s["what"]), t,
                               s["where"], T)

        return Block(f"where_{t + 1}", ("where",), kernel,
                     lambda frames, s: dens.blanket(frames, s, f"where_{t + 1}"))

    blocks = [where_block(t) for t in range(T)]
    blocks.append(Block("what", ("what",), lambda frames, s: WhatKernel(nets, frames, s["where"]),
                        lambda frames, s: dens.blanket(frames, s, "what")))
    return Sampler(init, blocks if sweeps_blocks else [], dens.log_joint)
