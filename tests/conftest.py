"""Test-wide settings: tests never reach a model hub and run JAX on the CPU, which shows
8 virtual devices, so that every training run in the suite goes through the sharded path
(a config's default mesh spreads over all devices) and test_sharding can build meshes.

The CPU backend compiles without LLVM's optimisations (`--xla_backend_optimization_level=0`,
unless XLA_FLAGS already sets a level): compiling is half of the suite's time, and a test runs
a program a few times where a user runs it thousands. Only the machine code differs: the
optimised HLO of the tiny train step is the same at both levels, and the suite passes at both.
On the 2-core EPYC that step compiles in 5.9 s instead of 10.1 and runs in 260 ms instead of
125; the whole suite took 17:10 instead of 19:47.

It also emits its kernels with XLA:CPU's elemental code generator rather than the MLIR fusion
emitters (`--xla_cpu_use_fusion_emitters=false`), whose fixed cost per compile dominates the
suite's thousands of small programs: on the same machine the tiny train step compiles in
4.3 s instead of 6.1 (and runs in 280 ms instead of 224 on one device), and the whole suite took
12:24 instead of 15:40. Two programs that share a computation may then round it differently:
the two tests that compared such programs bit for bit (test_dial, test_rounding) compare them
to float32 rounding. Whether this jaxlib still knows the flag (XLA aborts on an unknown one) is
asked first, in a child process; without it the suite runs as before, only slower."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA takes `--flag`: building compile options parses XLA_FLAGS."""
    probe = "from jaxlib import _jax; _jax.CompileOptions()"
    env = dict(os.environ, XLA_FLAGS=f"--{flag}")
    return (
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0
    )


def _set_default(flag: str, value: str) -> None:
    """Adds --flag=value to XLA_FLAGS unless they name the flag already."""
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{flag}={value}".strip()


# Read when JAX first starts its CPU backend, which nothing has done yet at this point.
_set_default("xla_force_host_platform_device_count", "8")
_set_default("xla_backend_optimization_level", "0")
if _xla_knows("xla_cpu_use_fusion_emitters=false"):
    _set_default("xla_cpu_use_fusion_emitters", "false")

from tiny_workdir import make_tiny_workdir  # noqa: E402 (after the environment is set)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The tiny backbone and embedding caches go to a per-session folder, not ~/.cache."""
    os.environ["LISENDIFF_CACHE"] = str(tmp_path_factory.mktemp("lisendiff_cache"))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A tiny LisenDiff workdir with a (noised, untrained) checkpoint, built once per session."""
    return make_tiny_workdir(tmp_path_factory.mktemp("runs") / "tiny")
