"""Test-wide settings: tests never reach a model hub and run JAX on the CPU."""

import os
from pathlib import Path

import pytest
from tiny_workdir import make_tiny_workdir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The tiny backbone and embedding caches go to a per-session folder, not ~/.cache."""
    os.environ["LISENDIFF_CACHE"] = str(tmp_path_factory.mktemp("lisendiff_cache"))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A tiny LisenDiff workdir with a (noised, untrained) checkpoint, built once per session."""
    return make_tiny_workdir(tmp_path_factory.mktemp("runs") / "tiny")
