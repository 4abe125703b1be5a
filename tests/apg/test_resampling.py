"""apg.resampling: resampled moments match weighted moments; only weight ratios matter; errors."""

import pytest
import torch

from apg.resampling import gather, resample


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_resampled_moments_match_weighted_moments(scheme):
    torch.manual_seed(0)
    B, L = 4000, 8
    x = torch.randn(B, L, dtype=torch.float64)
    log_w = torch.randn(B, L, dtype=torch.float64) * 1.5
    w = torch.softmax(log_w, -1)
    anc = resample(log_w, scheme)
    y = gather(x, anc)
    for f in (lambda v: v, lambda v: v**2):
        weighted = (w * f(x)).sum(-1)
        resampled = f(y).mean(-1)
        diff = resampled - weighted
        # unbiased per batch element: the mean difference over B elements is within 4 standard errors of 0
        assert abs(diff.mean().item()) < 4 * diff.std().item() / B**0.5 + 1e-12


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_ancestor_counts_follow_weights(scheme):
    torch.manual_seed(1)
    log_w = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)).expand(20000, 4)
    anc = resample(log_w, scheme)
    freq = torch.bincount(anc.reshape(-1), minlength=4).double() / anc.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01)
    if scheme == "systematic":  # each particle l is selected floor or ceil of L * w_l times
        counts = torch.stack([(anc == k).sum(-1) for k in range(4)], -1)
        assert ((counts >= 0) & (counts <= 2)).all()


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_invariant_to_a_constant_added_to_log_weights(scheme):
    log_w = torch.randn(3, 5, 6)
    torch.manual_seed(2)
    a = resample(log_w, scheme)
    torch.manual_seed(2)
    b = resample(log_w + 1234.5, scheme)
    assert torch.equal(a, b) and a.shape == (3, 5, 6) and a.dtype == torch.int64


def test_zero_weights_never_selected_and_errors():
    log_w = torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]]).expand(500, 4)
    for scheme in ("multinomial", "systematic"):
        anc = resample(log_w, scheme)
        assert not ((anc == 1) | (anc == 3)).any()
    valid = r"unknown resampling scheme 'stratified'; valid: \['multinomial', 'systematic'\]"
    with pytest.raises(ValueError, match=valid):
        resample(torch.zeros(2, 3), "stratified")
    with pytest.raises(ValueError, match="all log-weights -inf"):
        resample(torch.full((2, 3), -float("inf")))
    with pytest.raises(ValueError, match="NaN"):
        resample(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"expected \(\*batch, L\) = \(2, 3\)"):
        gather(torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.long))
