"""Bouncing MNIST for the generic drivers (`apg.models.base.Problem`): ``apg train bmnist``, ``apg evaluate bmnist``.

Settings (stored with every checkpoint, see `BMNISTSettings`): the video profile (canvas and
digit sizes, D and T of the training videos), the digits' source (scikit-learn's bundled 8x8 digits,
or MNIST's IDX files from ``--mnist-dir``) and the networks' hidden sizes.  Digit images are split
once: the last sixth is held out for evaluation, the rest renders the training videos.

Methods: ``apg`` (the one-shot proposal, then T + 1 learned Gibbs blocks per sweep) and ``rws`` (the
one-shot proposal alone, reweighted wake-sleep).  Each learns its own digit decoder (theta, eq. 6,
recorded once per sweep: `theta_terms` ``"sweep"``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from typing_extensions import override

from ...errors import APGError
from ...sampler import Result, Sampler
from ..base import Method, Problem, Trained
from .digits import digit_split, load_digits, split_digits
from .model import DigitDecoder, posterior_reconstruction
from .networks import WHERE_NETS, BMNISTProposals
from .sampler import apg_sampler
from .simulate import CPU, PROFILES, BMNISTConfig, Videos

__all__ = ["BMNISTProblem", "BMNISTSettings", "CPU_TRAIN", "posterior_reconstruction", "split_digits"]

#: training settings of the shipped cpu-profile checkpoints (the paper's, on a GPU: ``--profile paper
#: --batch 10 --particles 10 --sweeps 5 --lr 1e-4 --lr-final 1e-4 --iterations 200000 --datasets 60000``)
CPU_TRAIN = dict(batch_size=5, num_particles=10, lr=1e-3, lr_final=1e-4, num_datasets=60000, threads=1,
                 checkpoint_every=100, log_every=20)


@dataclass(frozen=True)
class BMNISTSettings:
    """What a bmnist checkpoint was trained on.

    Attributes:
        profile: canvas and digit sizes, D and T of the training videos (`.simulate.PROFILES`).
        mnist_dir: MNIST's IDX files (``--mnist-dir``); empty: scikit-learn's bundled digits.
        proposal_hidden: hidden units of the crop MLP's two layers (the soft-argmax position MLP has ``[1]``;
            the paper's position network ``[0]`` then two heads of ``[1]``).
        decoder_hidden: hidden units of the digit decoder's two layers.
        where_net: the position kernel's network: ``"soft-argmax"`` (ours) or ``"paper"`` (appendix E; see
            `.networks.BMNISTProposals`).
    """

    profile: BMNISTConfig = CPU
    mnist_dir: str = ""
    proposal_hidden: Tuple[int, int] = (200, 100)
    decoder_hidden: Tuple[int, int] = (100, 200)
    where_net: str = "soft-argmax"

    def __post_init__(self) -> None:
        if self.where_net not in WHERE_NETS:
            raise APGError(f"where_net must be one of {list(WHERE_NETS)}, got {self.where_net!r} (--where-net)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BMNISTSettings":
        """The settings stored by `config` (missing keys take their defaults)."""
        return cls(profile=BMNISTConfig(**d.get("profile", {})), mnist_dir=d.get("mnist_dir", ""),
                   proposal_hidden=tuple(d.get("proposal_hidden", (200, 100))),  # type: ignore[arg-type]
                   decoder_hidden=tuple(d.get("decoder_hidden", (100, 200))),  # type: ignore[arg-type]
                   where_net=d.get("where_net", "soft-argmax"))


class BMNISTProblem(Problem):
    """Bouncing MNIST for the generic drivers (see the module docstring)."""

    name = "bmnist"
    description = "bouncing MNIST tracking (section 5.5): Figs. 3-4"
    methods = {
        "apg": Method("apg", "APG: one-shot proposal + learned Gibbs kernels of where_1..where_T and what; learns "
                      "the digit decoder", train_defaults=dict(iterations=7000, num_sweeps=3, **CPU_TRAIN)),
        "rws": Method("rws", "RWS baseline: the one-shot proposal alone; learns the digit decoder", one_shot=True,
                      train_defaults=dict(iterations=7000, num_sweeps=1, **CPU_TRAIN)),
    }
    metric_fields = ("mse",)
    optional_methods = ("rws",)
    theta_terms = "sweep"

    def __init__(self, settings: BMNISTSettings = BMNISTSettings()) -> None:
        self.settings = settings
        self._digits: Optional[torch.Tensor] = None
        self._split: Optional[Tuple[torch.Tensor, torch.Tensor, str]] = None

    @property
    def cfg(self) -> BMNISTConfig:
        """The model configuration of these settings' profile."""
        return self.settings.profile

    @override
    def config(self) -> Dict[str, Any]:
        d = asdict(self.settings)
        d["proposal_hidden"], d["decoder_hidden"] = list(d["proposal_hidden"]), list(d["decoder_hidden"])
        return d

    @override
    def with_config(self, config: Dict[str, Any]) -> "BMNISTProblem":
        return BMNISTProblem(BMNISTSettings.from_dict(config))

    @override
    def add_train_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                            help="video profile: cpu (32x32 canvas, 8x8 digits, D=3, T=10) or paper (96x96, 28x28)")
        parser.add_argument("--mnist-dir", default=None, metavar="DIR",
                            help="MNIST's IDX files (train-images-idx3-ubyte[.gz]); default: scikit-learn's bundled "
                                 "8x8 digits, resized to the profile's digit size; with t10k-images-idx3-ubyte[.gz] "
                                 "there too, the evaluation's digits come from MNIST's test set")
        parser.add_argument("--where-net", choices=WHERE_NETS, default="soft-argmax",
                            help="the position kernel: soft-argmax (ours: the correlation map's soft-argmax plus an "
                                 "MLP correction) or paper (appendix E: FC 400 tanh, two FC 200 tanh heads)")

    @override
    def from_arguments(self, args: argparse.Namespace) -> "BMNISTProblem":
        profile = PROFILES[getattr(args, "profile", None) or "cpu"]
        hidden = dict(proposal_hidden=(400, 200), decoder_hidden=(200, 400)) if profile == PROFILES["paper"] else {}
        return BMNISTProblem(BMNISTSettings(profile=profile, mnist_dir=getattr(args, "mnist_dir", None) or "",
                                            where_net=getattr(args, "where_net", None) or "soft-argmax",
                                            **hidden))  # type: ignore[arg-type]

    def digits(self) -> torch.Tensor:
        """All digit images ``(n, h, h)`` of the settings' source, at the profile's digit size."""
        if self._digits is None:
            self._digits = load_digits(self.cfg.digit, self.settings.mnist_dir or None)
        return self._digits

    def digit_split(self) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """``(train, held_out, source)`` digit images ``(n, h, h)`` (`.digits.digit_split`)."""
        if self._split is None:
            self._split = digit_split(self.cfg.digit, self.settings.mnist_dir or None)
        return self._split

    @override
    def make_proposals(self, method: str) -> BMNISTProposals:
        self.method(method)
        nets = BMNISTProposals(self.cfg, hidden=self.settings.proposal_hidden, where_net=self.settings.where_net)
        nets.set_template(self.digit_split()[0])
        return nets

    @override
    def make_model(self) -> DigitDecoder:
        return DigitDecoder(self.cfg.digit, self.settings.decoder_hidden)

    @override
    def sampler(self, proposals: nn.Module, model: nn.Module, num_digits: Optional[int] = None,
                num_frames: Optional[int] = None, one_shot: bool = False) -> Sampler:
        assert isinstance(proposals, BMNISTProposals) and isinstance(model, DigitDecoder)
        return apg_sampler(proposals, model, num_digits or self.cfg.num_digits, num_frames or self.cfg.num_frames,
                           sweeps_blocks=not one_shot)

    @override
    def training_data(self, num_datasets: int, seed: int) -> Any:
        train = self.digit_split()[0]
        return Videos(num_datasets, self.cfg, train, seed=seed + 7919)

    @override
    def train_metrics(self, proposals: nn.Module, model: nn.Module, x: torch.Tensor,
                      result: Result) -> Dict[str, float]:
        assert isinstance(model, DigitDecoder)
        recon = posterior_reconstruction(model, result, self.cfg.canvas)
        return {"mse": float(((recon - x) ** 2).mean())}

    # -- evaluation ----------------------------------------------------------------------------------
    @override
    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        from .evaluation import add_arguments

        add_arguments(parser)

    @override
    def evaluate(self, trained: Dict[str, Trained], options: Mapping[str, Any], *, plots: Optional[str],
                 metrics: Dict[str, Optional[str]], progress: bool) -> Dict[str, Any]:
        from .evaluation import evaluate_bmnist

        return evaluate_bmnist(trained, options, plots=plots, metrics=metrics, progress=progress)

    @override
    def format(self, out: Dict[str, Any]) -> str:
        from .evaluation import format_table

        return format_table(out)

