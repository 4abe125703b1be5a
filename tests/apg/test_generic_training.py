"""The generic training loop on a model with learned parameters: both optimizers run, theta is learned.

A registered toy problem: mu ~ N(theta, 1), x_n ~ N(mu, 1) for n < 5, datasets drawn with theta = 2.
The one-shot proposal q(mu | x) = N(a mean(x) + b, e^s); the "apg" method adds a block kernel for mu
(the same network). Maximum likelihood for theta is the mean of the datasets' means, about 2.
"""

import math
import os

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from apg import models
from apg.models.base import Method, Problem
from apg.sampler import Block, Sampler
from apg.train import TrainConfig, load_proposals, train

TRUE_THETA = 2.0


class _Proposal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.s = nn.Parameter(torch.tensor(0.0))

    def dist(self, x):  # x (B, N) -> Normal over mu, batch (B, 1)
        return Normal(self.a * x.mean(-1, keepdim=True) + self.b, self.s.exp())


class _Kernel:
    def __init__(self, q: Normal, L: int) -> None:
        self.q, self.L = q, L

    def sample(self, generator=None):
        loc = self.q.loc.expand(self.q.loc.shape[0], self.L)
        return {"mu": torch.normal(loc, self.q.scale.expand_as(loc), generator=generator).detach()}

    def log_prob(self, values):
        return self.q.log_prob(values["mu"])


class ToyProblem(Problem):
    name = "toy"
    description = "a Gaussian with a learned prior mean"
    methods = {"apg": Method("apg", "one-shot plus a Gibbs block for mu",
                             train_defaults=dict(num_sweeps=2, num_particles=8, iterations=150, threads=0)),
               "rws": Method("rws", "one-shot", one_shot=True,
                             train_defaults=dict(num_sweeps=1, num_particles=8, iterations=150, threads=0))}

    def make_proposals(self, method):
        return _Proposal()

    def make_model(self):
        model = nn.Module()
        model.theta = nn.Parameter(torch.tensor(0.0))
        return model

    def sampler(self, proposals, model):
        def log_joint(x, state):
            mu = state["mu"]  # (B, L)
            return Normal(model.theta, 1.0).log_prob(mu) + Normal(mu.unsqueeze(-1), 1.0).log_prob(
                x.unsqueeze(-2)).sum(-1)

        def init(x, L, generator):
            kernel = _Kernel(proposals.dist(x), L)
            state = kernel.sample(generator)
            return state, kernel.log_prob(state)

        blocks = [Block("mu", ("mu",), lambda x, s: _Kernel(proposals.dist(x), s["mu"].shape[-1]), log_joint)]
        return Sampler(init, blocks, log_joint)  # the one-shot method runs num_sweeps = 1: no block is used

    def training_data(self, num_datasets, seed):
        g = torch.Generator().manual_seed(seed)
        mu = TRUE_THETA + torch.randn(num_datasets, 1, generator=g)
        return mu + torch.randn(num_datasets, 5, generator=g)

    def add_evaluate_arguments(self, parser):
        pass

    def evaluate(self, checkpoints, options, *, plots, metrics, progress):
        return {}

    def format(self, out):
        return ""


@pytest.fixture
def toy():
    models.register("toy", ToyProblem)
    yield
    models._REGISTRY.pop("toy")


@pytest.mark.parametrize("method", ["rws", "apg"])
def test_a_model_with_parameters_learns_them(toy, tmp_path, method):
    cfg = TrainConfig.for_method("toy", method, batch_size=20, num_datasets=400, lr=0.05, lr_final=0.05,
                                 log_every=50, checkpoint_every=50)
    last = train(str(tmp_path), cfg, progress=False)
    assert "loss_theta" in last and math.isfinite(last["loss_theta"])
    trained = load_proposals(os.path.join(tmp_path, "proposals.pt"))
    theta = trained.model.theta.item()
    data = ToyProblem().training_data(400, cfg.seed)
    mle = data.mean().item()
    assert abs(theta - mle) < 0.3, (theta, mle)  # from 0: the model was trained, toward its MLE
    assert abs(trained.proposals.a.item() - 0.5) > 1e-3  # and so were the proposals


def test_resume_restores_both_optimizers(toy, tmp_path):
    cfg = TrainConfig.for_method("toy", "apg", batch_size=10, num_datasets=100, iterations=12, log_every=3,
                                 checkpoint_every=4)
    train(str(tmp_path / "a"), cfg, progress=False)

    def interrupt(t):
        if t == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(str(tmp_path / "b"), cfg, progress=False, on_step=interrupt)
    train(str(tmp_path / "b"), cfg, progress=False)
    a, b = (torch.load(tmp_path / r / "proposals.pt", weights_only=True) for r in ("a", "b"))
    for key in ("state_dict", "model_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
