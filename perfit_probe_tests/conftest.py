"""Shared fixtures (tiny random-init models, the embedded model for the slow tests) and the test
tiers: every test module sits in ``unit/``, ``integration/`` or ``acceptance/``, and each test
is marked with its folder's name (``pytest -m unit``); acceptance tests are also ``slow``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from perfit_probe_tests.tiny import tiny_model

TIERS = ("unit", "integration", "acceptance")
"""The test folders, from no model to the real one (see each folder's ``__init__.py``)."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier; a test module outside the tier folders is refused."""
    root = Path(__file__).parent
    for item in items:
        if root not in item.path.parents:
            continue
        tier = item.path.relative_to(root).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path.relative_to(root.parent)}: move it to {root.name}/unit/, "
                                    "integration/ or acceptance/ (the test tiers: README, Contributing)")
        item.add_marker(tier)
        if tier == "acceptance":
            item.add_marker("slow")


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


PYREFT_DIR = Path(sys.prefix) / "extras" / "pyreft"
"""Where ``make setup`` installs the reference LoReFT implementation (pyreft + pyvene, no deps):
outside site-packages, because pyreft pins transformers 4.45 and is only an oracle here."""


@pytest.fixture(scope="session")
def pyreft():
    """The ``pyreft`` module (reference LoReFT), from ``PYREFT_DIR``; a missing install fails."""
    if not PYREFT_DIR.is_dir():
        pytest.fail(f"the reference implementation is not installed in {PYREFT_DIR}: run `make setup`")
    if str(PYREFT_DIR) not in sys.path:
        sys.path.append(str(PYREFT_DIR))
    import pyreft as module

    return module
