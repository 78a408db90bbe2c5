"""Shared fixtures: tiny random-init models, the embedded model (slow tests only)."""

from __future__ import annotations

import pytest
import torch

from perfit_probe_tests.tiny import tiny_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    """A tiny random-init model of each architecture (fp32, eager attention)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (converted once, then cached on disk)."""
    from perfit_probe.models import load_model

    return load_model("smollm2")


@pytest.fixture
def one_thread():
    """One torch thread: tiny models gain nothing from threads, and on a busy 2-core machine
    one thread is several times faster. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
