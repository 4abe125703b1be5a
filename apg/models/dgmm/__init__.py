"""The deep generative mixture of rings of the APG paper (Wu et al., ICML 2020, section 5.2), registered as ``"dgmm"``.

* `.data`: settings (the paper's, and the official code's where the
  paper is silent) and the seeded simulator.
* `.networks`: the learned decoder ``g_theta`` and the proposals.
* `.model`: the model declared with tmcgraph (Markov blankets from its
  factor graph), the block kernels and the APG sampler.
* `.evaluation`: Table 1b and Fig. 1b.

Methods: ``apg`` (one-shot encoder plus the kernels of ``{mu}`` and
``{c, alpha}``, residuals on the exact conditionals) and ``rws`` (the one-shot
encoder alone, trained by reweighted wake-sleep); ``apg-paper`` (appendix E's
networks, `PaperDGMMProposals`) and ``rws-lstm`` (the paper's LSTM-RWS
baseline, its one-shot statistic an LSTM).  Each learns its own decoder (theta,
eq. 6) with its proposals (phi, eq. 5).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from typing_extensions import override

from tmcgraph.arguments import positive_float, positive_int

from ...sampler import Result, Sampler
from ..base import Method, Problem, Trained
from ..common import add_sampler_arguments, option
from .data import ANGLES, PAPER, DGMMConfig, simulate
from .model import DGMMDensity, LocalKernel, MuKernel, apg_sampler, dgmm_model, exact_sampler, log_joint, pick
from .networks import (
    AnyProposals,
    CircleDecoder,
    Decoder,
    DGMMProposals,
    PaperDGMMProposals,
    SkipMLP,
    von_mises_log_prob,
    von_mises_sample,
)

__all__ = ["CircleDecoder", "DGMMConfig", "DGMMDensity", "DGMMProblem", "DGMMProposals", "Decoder", "LocalKernel",
           "MuKernel", "PAPER", "PaperDGMMProposals", "SkipMLP", "apg_sampler", "dgmm_model", "exact_sampler",
           "log_joint", "pick", "simulate", "von_mises_log_prob", "von_mises_sample"]

#: the CPU profile the shipped checkpoints were trained with (see docs/reproducing.md); the paper's
#: settings (batch 20, K=10, L=10, lr 1e-4, 200,000 iterations) are ``--batch 20 --sweeps 10 --particles 10
#: --lr 1e-4 --lr-final 1e-4 --iterations 200000`` on a GPU
CPU_PROFILE = dict(batch_size=10, lr=1e-3, lr_final=1e-4, threads=1, checkpoint_every=250, log_every=50)


class DGMMProblem(Problem):
    """The DGMM for the generic drivers (see `apg.models.base.Problem`).

    Args:
        cfg: sizes, prior and noise (default: the paper's).
    """

    name = "dgmm"
    description = "deep generative mixture of rings (section 5.2): Table 1b, Fig. 1b"
    methods = {
        "apg": Method("apg", "APG: one-shot encoder + learned Gibbs kernels of {mu} and {c, alpha}; learns the "
                      "decoder", train_defaults=dict(iterations=6000, num_particles=10, num_sweeps=5,
                                                     **CPU_PROFILE)),
        "rws": Method("rws", "RWS baseline: the one-shot encoder (neural sufficient statistics); learns the decoder",
                      one_shot=True, train_defaults=dict(iterations=6000, num_particles=50, num_sweeps=1,
                                                         **CPU_PROFILE)),
        "apg-paper": Method("apg-paper", "APG with appendix E's networks ([x_n, c_n] statistics for {mu}, an MLP of "
                            "x_n - mu_i for {c}, a Beta on the angle); learns the decoder",
                            train_defaults=dict(iterations=6000, num_particles=10, num_sweeps=5, **CPU_PROFILE)),
        "rws-lstm": Method("rws-lstm", "LSTM-RWS baseline (the paper's dlogp baseline): an LSTM over the points for "
                           "{mu}, appendix E's {c, alpha} proposal; learns the decoder", one_shot=True,
                           train_defaults=dict(iterations=6000, num_particles=50, num_sweeps=1, **CPU_PROFILE)),
    }
    metric_fields = ("ess_mu", "ess_local", "radius")
    optional_methods = ("apg-paper", "rws-lstm")

    def __init__(self, cfg: DGMMConfig = PAPER) -> None:
        self.cfg = cfg

    @override
    def config(self) -> Dict[str, Any]:
        return asdict(self.cfg)

    @override
    def with_config(self, config: Dict[str, Any]) -> "DGMMProblem":
        return DGMMProblem(DGMMConfig(**config))

    @override
    def add_train_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = PAPER
        parser.add_argument("--noise", type=positive_float, default=None, metavar="S",
                            help=f"the data's noise standard deviation per coordinate (default {d.noise}, the paper's "
                                 "Sigma_eps read as a standard deviation; the official simulator's is 0.1); also the "
                                 "model's unless --model-noise")
        parser.add_argument("--model-noise", type=positive_float, default=None, metavar="S",
                            help="the model's noise standard deviation (default: --noise; the official model's is 0.5)")
        parser.add_argument("--sigma0", type=positive_float, default=None, metavar="S",
                            help=f"standard deviation of the centres' prior (default {d.sigma0})")
        parser.add_argument("--radius", type=positive_float, default=None, metavar="R",
                            help=f"the simulated rings' radius (default {d.radius}; the model learns its own)")
        parser.add_argument("--angles", choices=ANGLES, default=None,
                            help="the simulated angles: uniform (i.i.d., the paper's model; default) or even (evenly "
                                 "spaced in two randomly shifted laps, the official simulator)")

    @override
    def from_arguments(self, args: argparse.Namespace) -> "DGMMProblem":
        given = {k: getattr(args, k, None) for k in ("noise", "model_noise", "sigma0", "radius", "angles")}
        return DGMMProblem(replace(self.cfg, **{k: v for k, v in given.items() if v is not None}))

    @override
    def make_proposals(self, method: str) -> AnyProposals:
        conditional = not self.method(method).one_shot
        if method == "apg-paper":
            return PaperDGMMProposals(self.cfg)
        if method == "rws-lstm":
            return PaperDGMMProposals(self.cfg, conditional=False, encoder="lstm")
        return DGMMProposals(self.cfg, conditional=conditional)

    @override
    def make_model(self) -> Decoder:
        return Decoder()

    @override
    def sampler(self, proposals: nn.Module, model: nn.Module) -> Sampler:
        assert isinstance(proposals, (DGMMProposals, PaperDGMMProposals)) and isinstance(model, Decoder)
        return apg_sampler(proposals, model)

    @override
    def training_data(self, num_datasets: int, seed: int) -> torch.Tensor:
        return simulate(num_datasets, self.cfg, seed=seed + 7919)["x"]

    @override
    def train_metrics(self, proposals: nn.Module, model: nn.Module, x: torch.Tensor,
                      result: Result) -> Dict[str, float]:
        assert isinstance(model, Decoder)
        return {"radius": float(model.radius.detach())}

    @override
    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        from .evaluation import EvalConfig

        d = EvalConfig()
        add_sampler_arguments(parser, datasets=d.num_datasets, seed=d.seed, particles=d.apg_particles,
                              rws_particles=d.rws_particles, sweeps=d.sweeps, rws_rows="row")
        parser.add_argument("--points", type=positive_int, default=d.num_points, metavar="N",
                            help="points per test dataset")

    @override
    def evaluate(self, trained: Dict[str, Trained], options: Mapping[str, Any], *, plots: Optional[str],
                 metrics: Dict[str, Optional[str]], progress: bool) -> Dict[str, Any]:
        from .evaluation import EvalConfig, evaluate_dgmm

        d = EvalConfig()
        nets = {}
        for method, t in trained.items():
            assert isinstance(t.proposals, (DGMMProposals, PaperDGMMProposals)) and isinstance(t.model, Decoder)
            nets[method] = (t.proposals, t.model)

        def get(key: str, default: Any) -> Any:
            return option(options, key, default)

        cfg = EvalConfig(num_datasets=get("datasets", d.num_datasets), seed=get("seed", d.seed),
                         apg_particles=get("particles", d.apg_particles),
                         rws_particles=get("rws_particles", d.rws_particles), sweeps=tuple(get("sweeps", d.sweeps)),
                         num_points=get("points", d.num_points), resampling=get("resampling", d.resampling))
        return evaluate_dgmm(nets, cfg, plots=plots, metrics=metrics, progress=progress)

    @override
    def format(self, out: Dict[str, Any]) -> str:
        from .evaluation import format_table

        return format_table(out)
