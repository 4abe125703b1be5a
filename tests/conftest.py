"""Shared fixtures: float64 where a test wants it, and a clean default dtype after every test."""

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (restored afterwards)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(before)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)
