"""Numbered step checkpoints of a training run, through orbax.

A checkpoint holds two items: `state`, a pytree of arrays (trainable parameters, optimizer
state, RNG key data, latent statistics), and `meta`, plain JSON (step, data position, config).
Each lives in `<workdir>/<step>/`; orbax writes to a temporary folder and renames it when
complete, so an interrupted save never leaves a half-written step behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lisendiff_jax.errors import UserError


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The workdir holds no complete checkpoint."""


class CorruptCheckpointError(UserError, ValueError):
    """A step folder exists but cannot be read back."""


class Checkpointer:
    """Saves and restores (state, meta) pairs under `workdir`, keeping the newest `keep`."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.workdir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> Path:
        """Writes step `step` (asynchronously; `wait` or `close` before relying on it)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        return self.workdir / str(step)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (the latest by default), state shaped like `abstract_state`.

        `abstract_state` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings where
        the run is sharded); the restored arrays take its dtypes and placement.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFoundError(f"{self.workdir}: no checkpoint (no step folder)")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax raises many types for unreadable or mismatched data
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CorruptCheckpointError(
                f"{self.workdir / str(step)}: cannot restore checkpoint "
                f"({type(err).__name__}: {first_line[:300]})"
            ) from None
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
