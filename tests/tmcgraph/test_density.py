"""JointDensity: the log joint of a declared model at given particle values, and its Markov blankets."""

import pytest
import torch
from torch.distributions import Independent, Normal

from tmcgraph import Model, TMCError
from tmcgraph.density import JointDensity

D64 = torch.float64


def _model():
    m = Model()
    m.plate("N", 4)
    m.plate("T", 3)
    m.latent("g", prior=lambda: Independent(Normal(torch.zeros(2, dtype=D64), 1.0), 1))
    m.latent("z", prior=lambda g: Normal(g[..., 0], 1.0), plates=["N"])
    m.latent("w", prior=lambda z: Normal(z, 0.5), plates=["N", "T"])
    m.observe("x", lambda w, g: Normal(w + g[..., 1], 0.3), plates=["N", "T"])
    return m


def _values(B=2, L=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=D64)  # noqa: E731
    return {"g": r(B, L, 2), "z": r(B, L, 4), "w": r(B, L, 4, 3)}, {"x": r(B, 4, 3)}


def _by_hand(v, d):
    g, z, w, x = v["g"], v["z"], v["w"], d["x"].unsqueeze(1)
    lg = Normal(0.0, 1.0).log_prob(g).sum(-1)
    lz = Normal(g[..., :1], 1.0).log_prob(z)  # (B, L, N)
    lw = Normal(z.unsqueeze(-1), 0.5).log_prob(w)  # (B, L, N, T)
    lx = Normal(w + g[..., 1, None, None], 0.3).log_prob(x)
    return lg, lz, lw, lx


def test_log_prob_matches_the_joint_by_hand():
    dens = JointDensity(_model())
    v, d = _values()
    lg, lz, lw, lx = _by_hand(v, d)
    total = lg + lz.sum(-1) + lw.sum((-2, -1)) + lx.sum((-2, -1))
    assert torch.allclose(dens.log_prob(v, d), total)
    # per element of a plate: every summed site must be in it
    got = dens.log_prob(v, d, sites=["z", "w", "x"], keep_plates=["N"])
    assert torch.allclose(got, lz + lw.sum(-1) + lx.sum(-1))
    got = dens.log_prob(v, d, sites=["w", "x"], keep_plates=["T", "N"])
    assert torch.allclose(got, (lw + lx).transpose(-1, -2))


def test_blankets_come_from_the_factor_graph():
    dens = JointDensity(_model())
    assert dens.blanket(["g"]) == ("g", "z", "x")
    assert dens.blanket(["z"]) == ("z", "w")
    assert dens.blanket(["w"]) == ("w", "x")
    assert dens.blanket(["z", "w"]) == ("z", "w", "x")


def test_blanket_ratio_equals_the_joint_ratio():
    """Changing one block: the blanket's difference is the joint's difference."""
    dens = JointDensity(_model())
    v, d = _values(seed=1)
    v2 = dict(v, z=v["z"] + 0.3)
    full = dens.log_prob(v2, d) - dens.log_prob(v, d)
    sites = dens.blanket(["z"])
    assert torch.allclose(dens.log_prob(v2, d, sites=sites) - dens.log_prob(v, d, sites=sites), full)


def test_errors_name_the_problem():
    m = _model()
    dens = JointDensity(m)
    v, d = _values()
    with pytest.raises(TMCError, match="latent 'z'.*expected"):
        dens.log_prob(dict(v, z=v["z"][..., :3]), d)
    with pytest.raises(TMCError, match="no value given for latent"):
        dens.log_prob({"g": v["g"]}, d)
    with pytest.raises(TMCError, match="'g' is not in plate"):
        dens.log_prob(v, d, sites=["g"], keep_plates=["N"])
    with pytest.raises(TMCError, match="not latents"):
        dens.blanket(["x"])
    with pytest.raises(TMCError, match="not a plate"):
        dens.log_prob(v, d, keep_plates=["M"])
    with pytest.raises(TMCError, match="observation 'x'"):
        dens.log_prob(v, {"x": d["x"][..., :2]})
    m.latent("extra", prior=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCError, match="edited"):
        dens.log_prob(v, d)


def test_data_checks_are_not_skipped_for_changed_data():
    """The data check is cached for the very same, unmodified tensors only: NaN written in place is caught."""
    m = Model()
    m.plate("N", 3)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    dens = JointDensity(m)
    x = torch.zeros(3)
    values = {"mu": torch.zeros(4)}
    dens.log_prob(values, {"x": x})
    dens.log_prob(values, {"x": x})  # cached
    x[1] = float("nan")  # in place: the version counter moves
    with pytest.raises(TMCError, match="contains NaN"):
        dens.log_prob(values, {"x": x})
    with pytest.raises(TMCError, match="contains NaN"):
        dens.log_prob(values, {"x": torch.tensor([0.0, float("nan"), 0.0])})
