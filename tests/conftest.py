"""Fixtures used by more than one test module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from two_ranks import launch_stage  # noqa: F401 -- the two-process tests' stage launcher


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model_dir(arch="qwen2", template="chatml", **overrides)`: that tiny model
    (`ssb.bench.random_models.save_tiny_model`) saved once per session; every test asking for
    the same one gets the same directory, so tests only read it."""
    from ssb.bench.random_models import save_tiny_model

    saved: dict[tuple, Path] = {}

    def model_dir(arch: str = "qwen2", template: str = "chatml", **overrides) -> Path:
        key = (arch, template, *sorted(overrides.items()))
        if key not in saved:
            name = "-".join([arch, template, *(f"{k}={v}" for k, v in sorted(overrides.items()))])
            root = tmp_path_factory.mktemp(name)
            saved[key] = save_tiny_model(root / "model", arch, template, **overrides)
        return saved[key]

    return model_dir


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir) -> Path:
    """The tiny Qwen2 chat model (ChatML template)."""
    return tiny_model_dir("qwen2", "chatml")


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_model_dir) -> Path:
    """The tiny Qwen2 base model (no chat template: the few-shot format)."""
    return tiny_model_dir("qwen2", "none")
