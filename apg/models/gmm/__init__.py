"""The Gaussian mixture model of the APG paper (Wu et al., ICML 2020, section 5.1), registered as ``"gmm"``.

* `.algebra`: the model's exact conjugate algebra, simulator and Gibbs sampler.
* `.model`: the model declared with tmcgraph (Markov blankets from its
  factor graph), the block kernels, the exact and learned APG samplers, the
  inclusive KL of eq. 4.
* `.networks`: the learned proposals (appendix E) and the RWS-LSTM encoder.
* `.evaluation`: Table 1a, Figs. 1a and 2.

Methods: ``apg`` (one-shot encoder plus block kernels of the globals and the
assignments, K sweeps), ``rws-mlp`` and ``rws-lstm`` (one-shot encoders trained
by reweighted wake-sleep).  The model has no learned parameters.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from typing_extensions import override

from tmcgraph.arguments import positive_float, positive_int

from ...errors import APGError
from ...sampler import Result, Sampler
from ..base import Method, Problem, Trained
from ..common import add_sampler_arguments, option
from .algebra import (
    PAPER,
    GMMConfig,
    assignment_logits,
    gibbs,
    global_posterior,
    log_evidence_given_c,
    log_joint,
    normal_gamma_log_prob,
    prior_params,
    sample_categorical,
    sample_normal_gamma,
    simulate,
    sufficient_statistics,
)
from .evaluation import EvalConfig, evaluate_gmm, format_table
from .model import CategoricalKernel, NormalGammaKernel, apg_sampler, exact_sampler, gmm_model, inclusive_kl
from .networks import GMMProposals, LSTMNormalGamma

__all__ = [
    "CategoricalKernel",
    "EvalConfig",
    "GMMConfig",
    "GMMProblem",
    "GMMProposals",
    "LSTMNormalGamma",
    "NormalGammaKernel",
    "apg_sampler",
    "assignment_logits",
    "evaluate_gmm",
    "exact_sampler",
    "format_table",
    "gibbs",
    "global_posterior",
    "gmm_model",
    "inclusive_kl",
    "log_evidence_given_c",
    "log_joint",
    "normal_gamma_log_prob",
    "prior_params",
    "sample_categorical",
    "sample_normal_gamma",
    "simulate",
    "sufficient_statistics",
]

#: the settings the shipped checkpoints were trained with (see docs/apg.md)
_RWS_DEFAULTS = dict(iterations=10000, num_particles=100, num_sweeps=1, lr=2e-3, lr_final=1e-4, threads=1)


class GMMProblem(Problem):
    """The GMM for the generic drivers (see `apg.models.base.Problem`).

    Args:
        cfg: sizes and Normal-Gamma hyperparameters (default: the paper's).
    """

    name = "gmm"
    description = "Gaussian mixture (section 5.1): Table 1a, Figs. 1a and 2"
    methods = {
        "apg": Method("apg", "APG: one-shot encoder + learned Gibbs kernels of {mu, tau} and {c}",
                      train_defaults=dict(iterations=32000, num_particles=10, num_sweeps=10, lr=2e-3,
                                          lr_final=1e-4, threads=1)),
        "apg-features": Method("apg-features", "APG with the assignment network fed [x - mu, (x - mu)^2 tau, "
                               "log tau] (the exact logit is linear in them)",
                               train_defaults=dict(iterations=2000, num_particles=10, num_sweeps=10, lr=2e-3,
                                                   lr_final=1e-4, threads=1, init="shipped:gmm-apg")),
        "rws-mlp": Method("rws-mlp", "RWS baseline: neural-sufficient-statistics encoder, one shot", one_shot=True,
                          train_defaults=_RWS_DEFAULTS),
        "rws-lstm": Method("rws-lstm", "RWS baseline: LSTM encoder over the points, one shot", one_shot=True,
                           train_defaults=_RWS_DEFAULTS),
    }
    metric_fields = ("ess_globals", "ess_assignments", "kl_globals", "kl_assignments")
    optional_methods = ("apg-features",)

    def __init__(self, cfg: GMMConfig = PAPER) -> None:
        self.cfg = cfg

    @override
    def config(self) -> Dict[str, Any]:
        return asdict(self.cfg)

    @override
    def with_config(self, config: Dict[str, Any]) -> "GMMProblem":
        return GMMProblem(GMMConfig(**config))

    @override
    def make_proposals(self, method: str) -> GMMProposals:
        m = self.method(method)
        encoder = "lstm" if method == "rws-lstm" else "mlp"
        features = "conjugate" if method == "apg-features" else "paper"
        return GMMProposals(self.cfg, encoder=encoder, conditional=not m.one_shot, features=features)

    def init_from(self, method: str, proposals: nn.Module, model: nn.Module, trained: Trained) -> None:
        """As the default; ``apg-features`` may also start from trained ``apg`` networks.

        It takes their one-shot and globals kernels (its
        assignment network, with other inputs, starts fresh).
        """
        if method == "apg-features" and (trained.problem.name, trained.method) == ("gmm", "apg"):
            assert isinstance(proposals, GMMProposals) and isinstance(trained.proposals, GMMProposals)
            assert proposals.globals is not None and trained.proposals.globals is not None
            proposals.oneshot.load_state_dict(trained.proposals.oneshot.state_dict())
            proposals.globals.load_state_dict(trained.proposals.globals.state_dict())
            return
        super().init_from(method, proposals, model, trained)

    @override
    def sampler(self, proposals: nn.Module, model: nn.Module) -> Sampler:
        assert isinstance(proposals, GMMProposals)
        return apg_sampler(proposals)

    @override
    def training_data(self, num_datasets: int, seed: int) -> torch.Tensor:
        return simulate(num_datasets, self.cfg, seed=seed + 7919)["x"]

    @override
    def train_metrics(self, proposals: nn.Module, model: nn.Module, x: torch.Tensor,
                      result: Result) -> Dict[str, float]:
        assert isinstance(proposals, GMMProposals)
        kl = inclusive_kl(proposals, x, result.state, result.log_weights)
        return {f"kl_{name}": v.mean().item() for name, v in kl.items()}

    @override
    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = EvalConfig()
        add_sampler_arguments(parser, datasets=d.num_datasets, seed=d.seed, particles=d.apg_particles,
                              rws_particles=d.rws_particles, sweeps=d.sweeps)
        parser.add_argument("--nu0", type=positive_float, default=None,
                            help="the prior's nu0 for the test data and the model (default: the networks', 0.3 as "
                                 "in the paper; the official code and coix use 0.1)")
        parser.add_argument("--budget", type=positive_int, default=None, metavar="K*L",
                            help=f"with --plots: the fixed budget K * L of Fig. 2 (default {d.budget})")
        parser.add_argument("--fig2-blocks", choices=("blocked", "joint"), nargs="+", default=None,
                            help="with --plots: Fig. 2's samplers: blocked (resampling before each block, the APG "
                                 "sampler) and/or joint ({tau, mu, c} as one block, resampling once per sweep) "
                                 f"(default {' '.join(d.budget_blocks)})")
        parser.add_argument("--convergence-sweeps", type=positive_int, default=None, metavar="K",
                            help="with --plots: sweeps of the convergence figure (APG, BPG, Gibbs, HMC-RWS; "
                                 f"default {d.convergence_sweeps})")
        parser.add_argument("--convergence-datasets", type=positive_int, default=None, metavar="N",
                            help=f"with --plots: its test datasets (default {d.convergence_datasets}, with "
                                 f"{d.convergence_runs} runs, as the official code)")
        parser.add_argument("--bpg-factor", type=positive_int, default=None, metavar="F",
                            help=f"with --plots: BPG's particles are F times APG's (default {d.bpg_factor})")
        parser.add_argument("--hmc-leapfrog", type=positive_int, nargs="+", default=None, metavar="LF",
                            help="with --plots: leapfrog steps per HMC transition, one curve each (default "
                                 f"{' '.join(map(str, d.hmc_leapfrog))}; step size {d.hmc_step_size})")
        parser.add_argument("--budget-sweeps", type=positive_int, nargs="+", default=None, metavar="K",
                            help="with --plots: the values of K in Fig. 2 (default "
                                 f"{' '.join(map(str, d.budget_sweeps))})")

    @override
    def evaluate(self, trained: Dict[str, Trained], options: Mapping[str, Any], *, plots: Optional[str],
                 metrics: Dict[str, Optional[str]], progress: bool) -> Dict[str, Any]:
        d = EvalConfig()
        if plots is None:
            given = [flag for flag, key in (("--budget", "budget"), ("--budget-sweeps", "budget_sweeps"),
                                            ("--fig2-blocks", "fig2_blocks"),
                                            ("--convergence-sweeps", "convergence_sweeps"),
                                            ("--convergence-datasets", "convergence_datasets"),
                                            ("--bpg-factor", "bpg_factor"), ("--hmc-leapfrog", "hmc_leapfrog"))
                     if options.get(key) is not None]
            if given:
                raise APGError(f"{' and '.join(given)} set(s) up a figure, which is drawn only with --plots DIR")
        nets = {}
        for method, t in trained.items():
            loaded = t.proposals
            assert isinstance(loaded, GMMProposals)
            nets[method] = loaded

        def get(key: str, default: Any) -> Any:
            return option(options, key, default)

        cfg = EvalConfig(num_datasets=get("datasets", d.num_datasets), seed=get("seed", d.seed),
                         apg_particles=get("particles", d.apg_particles),
                         rws_particles=get("rws_particles", d.rws_particles), sweeps=tuple(get("sweeps", d.sweeps)),
                         budget=get("budget", d.budget), budget_sweeps=tuple(get("budget_sweeps", d.budget_sweeps)),
                         nu0=options.get("nu0"), resampling=get("resampling", d.resampling),
                         budget_blocks=tuple(dict.fromkeys(get("fig2_blocks", d.budget_blocks))),
                         convergence_sweeps=get("convergence_sweeps", d.convergence_sweeps),
                         convergence_datasets=get("convergence_datasets", d.convergence_datasets),
                         bpg_factor=get("bpg_factor", d.bpg_factor),
                         hmc_leapfrog=tuple(get("hmc_leapfrog", d.hmc_leapfrog)))
        return evaluate_gmm(nets, cfg, plots=plots, metrics=metrics, progress=progress)

    @override
    def format(self, out: Dict[str, Any]) -> str:
        return format_table(out)
