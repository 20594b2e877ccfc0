"""Test-wide settings: tests never reach a model hub and run JAX on the CPU, which shows
8 virtual devices, so that every training run in the suite goes through the sharded path
(a config's default mesh spreads over all devices) and test_sharding can build meshes."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Read when JAX first starts its CPU backend, which nothing has done yet at this point.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from tiny_workdir import make_tiny_workdir  # noqa: E402 (after the environment is set)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The tiny backbone and embedding caches go to a per-session folder, not ~/.cache."""
    os.environ["LISENDIFF_CACHE"] = str(tmp_path_factory.mktemp("lisendiff_cache"))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A tiny LisenDiff workdir with a (noised, untrained) checkpoint, built once per session."""
    return make_tiny_workdir(tmp_path_factory.mktemp("runs") / "tiny")
