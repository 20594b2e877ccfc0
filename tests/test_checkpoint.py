"""Step checkpoints: round trip, latest step, retention, and clear errors."""

from __future__ import annotations

import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lisendiff_jax.checkpoint import Checkpointer, CheckpointNotFoundError


def state(value: float):
    return {
        "params": {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.zeros((2,), jnp.bfloat16)},
        "rng": jnp.asarray([1, 2], jnp.uint32),
    }


def test_round_trip_latest_and_retention(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save(step, state(step), {"step": step, "data": {"epoch": 0, "index": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["20", "30"]
    restored, meta = ckpt.restore(state(0))
    assert meta == {"step": 30, "data": {"epoch": 0, "index": 30}}
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 30.0))
    assert restored["params"]["b"].dtype == jnp.bfloat16
    earlier, meta = ckpt.restore(state(0), step=20)
    assert meta["step"] == 20 and float(earlier["params"]["w"][0, 0]) == 20.0
    ckpt.close()
    # A new Checkpointer on the same workdir finds what the first one wrote.
    assert Checkpointer(tmp_path).latest_step() == 30


def test_empty_workdir_and_corrupt_step_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(state(0))
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(5, state(5), {"step": 5})
    ckpt.close()
    for f in (tmp_path / "run" / "5" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    # In a child process: a failed restore leaves tensorstore's threads behind, which must not
    # outlive their process into this one's shutdown.
    child = f"""
import jax.numpy as jnp
from lisendiff_jax.checkpoint import Checkpointer, CorruptCheckpointError
try:
    Checkpointer({str(tmp_path / "run")!r}).restore({{"params": {{"w": jnp.zeros((3, 2)),
        "b": jnp.zeros((2,), jnp.bfloat16)}}, "rng": jnp.zeros((2,), jnp.uint32)}})
except CorruptCheckpointError as err:
    print("CorruptCheckpointError:", err, flush=True)
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert re.search(r"CorruptCheckpointError: .*run/5: cannot restore", run.stdout), run.stderr
