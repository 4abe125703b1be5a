"""Training on a device: settings are checked on any machine; the CUDA runs skip without a GPU."""

from __future__ import annotations

import pytest
import torch

from apg.errors import APGError
from apg.train import TrainConfig, load_proposals, train

CUDA = torch.cuda.is_available()
TINY = dict(iterations=3, batch_size=4, num_particles=4, num_datasets=8, log_every=3, checkpoint_every=3, threads=1)


def test_device_setting_is_checked():
    with pytest.raises(APGError, match=r"device must be a torch device .* got 'gpu0' \(--device\)"):
        TrainConfig(device="gpu0", **TINY)
    if not CUDA:
        with pytest.raises(APGError, match=r"no CUDA device available \(--device\)"):
            TrainConfig(device="cuda", **TINY)


def test_explicit_cpu_device_is_the_default_run(tmp_path):
    a = train(str(tmp_path / "a"), TrainConfig(num_sweeps=2, **TINY), progress=False)
    b = train(str(tmp_path / "b"), TrainConfig(num_sweeps=2, device="cpu", **TINY), progress=False)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: checks --device cuda training on a GPU")
@pytest.mark.parametrize("model,method,sweeps", [("gmm", "apg", 2), ("dgmm", "apg", 2), ("dgmm", "rws", 1),
                                               ("bmnist", "apg", 2), ("bmnist", "rws", 1)])
def test_training_on_cuda(tmp_path, model, method, sweeps):
    cfg = TrainConfig.for_method(model, method, device="cuda", num_sweeps=sweeps, **TINY)
    last = train(str(tmp_path / "run"), cfg, progress=False)
    assert all(v == v for v in last.values())  # no NaN
    t = load_proposals(str(tmp_path / "run" / "proposals.pt"))  # saved on the CPU
    assert all(p.device.type == "cpu" for p in t.proposals.parameters())
    # resumable: a finished run reports its last metrics
    assert train(str(tmp_path / "run"), cfg, progress=False)["iteration"] == 3
