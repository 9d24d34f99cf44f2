"""Fixtures shared by the tests: the Triton interpreter, tiny Wan models (head_dim 128) with random weights and
their diffusers twins. Helpers that are not fixtures: tests/_helpers.py; model builders and inputs:
wan_model/testing.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from wan_model.core.config import WanConfig
from wan_model.testing import random_model

from _helpers import VARIANTS

# Hypothesis in CI (.ci/run sets HYPOTHESIS_PROFILE=ci): the same examples on every run (seeded per test function:
# a changed test draws anew), so whether a change lands never hinges on a fresh random draw. Elsewhere random
# draws, as a developer explores; a failure prints the example and its reproduce_failure blob either way.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def fp32_models():
    """{variant: (our fp32 WanModel with random weights, diffusers model with the same weights)}."""
    from wan_model.compat.diffusers import to_diffusers_model

    out = {}
    for i, name in enumerate(VARIANTS):
        model = random_model(WanConfig.from_preset(name), seed=i).eval()
        out[name] = (model, to_diffusers_model(model))
    return out


@pytest.fixture(scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 for a whole test module (`pytestmark = pytest.mark.usefixtures("triton_interpreter")`):
    the launchers read it when a backend is resolved, so CPU tensors get the interpreted kernels."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def capability(monkeypatch):
    """Simulate a CUDA device of a capability: `capability(cap)` points torch.cuda at it and forgets every
    route (the dispatch tests of tests/test_routing.py, test_fp8.py, test_attention_int8.py)."""
    from wan_kernels import routing

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        routing.clear_caches()

    yield set_capability
    routing.clear_caches()
