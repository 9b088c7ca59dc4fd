"""Test environment: offline hubs, no W&B, fp32 on CPU, a small dummy method for framework tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def dummy_method(monkeypatch):
    """Register ``dummy`` (tests/_dummy_method.py) in the method registry for framework tests."""
    from zsad import registry

    monkeypatch.setitem(
        registry.REGISTRY,
        "dummy",
        registry.MethodEntry("dummy", "_dummy_method", "DummyConfig", "Dummy", "Dummy"),
    )
    return "dummy"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
