"""Rebuilding a model for inference: from a training workdir, or from a bare backbone.

Every loader returns (model, config, tokenizer) with `model` a `LisenDiff` in eval mode whose
LoRA adapters are merged into the base kernels (`merge_lora`): inference runs plain
projections, and a workdir and its export (`lisendiff_jax.export`) hold the same weights bit
for bit, so they give the same samples. A run trained on a quantized base
(`model.base_quantization`) keeps it quantized, its adapters unmerged on top: merging would
de-quantize the whole backbone (an 8B's projections back to 13 GiB of bf16), the memory that
quantizing saved. Its export, merged in bf16, then samples close to it, not bit for bit.
`config` is the run's full config (`config.json`); `config.model.lisendiff` says whether the
LisenDiff modules are there (False for the LoRA-only baseline and for a bare backbone).

From a workdir only what inference needs is read: the trainable parameters and the latent
statistics (orbax partial restore), not the optimizer state, which is twice their size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.backbone.quantized import is_quantized
from lisendiff_jax.checkpoint import CheckpointNotFoundError, CorruptCheckpointError
from lisendiff_jax.config import base_config, fill_added_model_options
from lisendiff_jax.errors import UserError
from lisendiff_jax.method.lora import merge_lora
from lisendiff_jax.method.model import LatentStat, LisenDiff
from lisendiff_jax.tiny import backbone_folder

_FAILED_READS_GRACE_S = 0.5
Loaded = tuple[LisenDiff, ml_collections.ConfigDict, PreTrainedTokenizerBase]


class RestoreError(UserError, ValueError):
    """A folder that does not hold what a model needs; the message names the file."""


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run's config from `<workdir>/config.json`."""
    workdir = Path(workdir).absolute()  # orbax takes absolute paths only
    if not workdir.is_dir():
        raise RestoreError(f"{workdir}: no such workdir")
    path = workdir / "config.json"
    if not path.is_file():
        raise RestoreError(
            f"{path} not found: not a training workdir (train one with "
            f"python train.py --workdir {workdir})"
        )
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RestoreError(f"{path}: not valid JSON ({err})") from None
    fill_added_model_options(config.get("model"))
    # The model section decides which parameters exist; a run from a version with other model
    # options has checkpoints this version cannot rebuild.
    missing = _missing_keys(base_config().model, config.get("model"), "model")
    if missing:
        raise RestoreError(
            f"{path}: written by another version of lisendiff_jax (no --config.{missing}); "
            "sample it with that version, or train it again"
        )
    return config


def _missing_keys(expected: ml_collections.ConfigDict, saved: object, where: str) -> str | None:
    """The first option of `expected` that `saved` lacks, dotted; None when it has them all."""
    if not isinstance(saved, ml_collections.ConfigDict):
        return where
    for key, value in expected.items():
        if key not in saved:
            return f"{where}.{key}"
        if isinstance(value, ml_collections.ConfigDict):
            missing = _missing_keys(value, saved[key], f"{where}.{key}")
            if missing:
                return missing
    return None


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise RestoreError(f"{folder}: the tokenizer has no chat template")
    return tokenizer


def build_model(
    folder: str | os.PathLike,
    config: ml_collections.ConfigDict,
    latent_dim: int,
    dtype: str | None = None,
    quantized: bool = True,
) -> LisenDiff:
    """The run's model around the backbone in `folder`, with freshly initialised trainable
    parameters (to be overwritten), LoRA not yet merged. `dtype` overrides the run's backbone
    parameter and compute dtypes (e.g. float32 on a CPU). The run's `model.base_quantization`
    quantizes the backbone as training did (the same numbers), unless `quantized` is False (an
    export, whose merged weights are float)."""
    fill_added_model_options(config.get("model"))
    m = config.model
    backbone = load_backbone(
        folder,
        dtype=dtype or m.param_dtype,
        compute_dtype=dtype or m.compute_dtype,
        quantization=m.base_quantization if quantized else "none",
    )
    return LisenDiff(backbone, m, latent_dim, rngs=nnx.Rngs(params=0, dropout=1))


def for_inference(model: LisenDiff) -> LisenDiff:
    """Eval mode (no LoRA dropout) and adapters folded into the base kernels, in place; on a
    quantized base the adapters stay, unmerged (see the module's docstring)."""
    model.eval()
    if not is_quantized(model.backbone):
        merge_lora(model.backbone)
    return model


def _steps(workdir: Path) -> list[int]:
    # Read-only: a training run may be writing its next step into the same folder.
    manager = ocp.CheckpointManager(
        workdir, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def checkpoint_step(workdir: str | os.PathLike, step: int | None = None) -> Path:
    """The folder of checkpoint `step` (default: the newest) under `workdir`."""
    workdir = Path(workdir).absolute()  # orbax takes absolute paths only
    steps = _steps(workdir)
    if not steps:
        raise CheckpointNotFoundError(
            f"{workdir}: no checkpoint yet (no complete step folder); train first with "
            f"python train.py --workdir {workdir}"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFoundError(
            f"{workdir}: no checkpoint for step {step} (have {', '.join(map(str, steps))})"
        )
    return workdir / str(step)


def _corrupt(path: Path, err: Exception) -> CorruptCheckpointError:
    first_line = (str(err).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
    return CorruptCheckpointError(
        f"{path}: cannot restore checkpoint ({type(err).__name__}: {first_line[:300]})"
    )


def _latent_dim(state_dir: Path) -> int:
    """The latent width, from the checkpoint's metadata (no array is read)."""
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(state_dir)
        tree = metadata.item_metadata.tree if metadata.item_metadata is not None else {}
        return int(tree["latent_stats"]["latent_mean"]["value"].shape[0])
    except Exception as err:  # orbax raises many types for unreadable metadata
        if isinstance(err, (KeyError, TypeError)):
            err = ValueError("its metadata is missing or unreadable")
        raise _corrupt(state_dir.parent, err) from None


def _restore_partial(state_dir: Path, item: dict[str, Any]) -> dict[str, Any]:
    """The entries of `item` (abstract or concrete pytrees) read from a saved state."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, item)
    args = ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
    )
    # When a read fails, orbax closes its event loop under the reads still in flight, and each
    # prints a traceback to sys.stderr from its own thread, before and after orbax raises.
    # Their output is held back, and dropped if the restore fails.
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            restored = ocp.PyTreeCheckpointer().restore(state_dir, args=args)
    except Exception as err:  # as above: missing files, bad bytes, mismatched shapes
        with contextlib.redirect_stderr(io.StringIO()):
            time.sleep(_FAILED_READS_GRACE_S)
        raise _corrupt(state_dir.parent, err) from None
    sys.stderr.write(held.getvalue())
    return restored


def restore_workdir(
    workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None
) -> Loaded:
    """The model of a training run at `step` (default: the newest checkpoint) as it trained:
    adapters unmerged. `load_workdir` is the same, ready for inference."""
    workdir = Path(workdir).absolute()  # orbax takes absolute paths only
    config = read_run_config(workdir)
    step_dir = checkpoint_step(workdir, step)
    state_dir = step_dir / "state"
    folder = backbone_folder(config.model.backbone)
    model = build_model(folder, config, _latent_dim(state_dir), dtype)
    _, trainable, stats, _ = nnx.split(model, model.trainable_filter(), LatentStat, ...)
    restored = _restore_partial(state_dir, {"trainable": trainable, "latent_stats": stats})
    nnx.update(model, restored["trainable"], restored["latent_stats"])
    return model, config, load_tokenizer(folder)


def load_workdir(
    workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None
) -> Loaded:
    """The model of a training run at `step` (default: the newest checkpoint), for inference."""
    model, config, tokenizer = restore_workdir(workdir, step, dtype)
    return for_inference(model), config, tokenizer


def base_model_config(backbone: str, dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """A run config describing an untrained backbone: no LisenDiff modules, nothing trained."""
    config = base_config()
    config.name = "base"
    config.model.backbone = backbone
    config.model.lisendiff = False
    config.model.train_lm_head = False  # a tied head would be refused, and nothing trains
    config.model.param_dtype = config.model.compute_dtype = dtype
    return config


def load_base(backbone: str, dtype: str = "bfloat16") -> Loaded:
    """A bare backbone (hub id, folder, or "tiny") as a model that samples like a workdir's:
    the BaseLLM baseline. Its LoRA starts at zero, so merging it leaves the weights as loaded.
    """
    config = base_model_config(backbone, dtype)
    folder = backbone_folder(backbone)
    # No latent is ever read; the statistics only need some width.
    model = build_model(folder, config, latent_dim=1)
    return for_inference(model), config, load_tokenizer(folder)


class _MainThreadStderr(io.TextIOBase):
    """stderr that passes the main thread's writes and drops those of worker threads.

    When a checkpoint is corrupt, the reads orbax and tensorstore still have in flight fail on
    their own threads and print tracebacks at unpredictable times, before or after the
    command line has printed its one-line error. A command line's own messages all come from
    the main thread.
    """

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    # What libraries ask of sys.stderr besides writing (tqdm, logging, faulthandler).
    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return self._stream.encoding


def command_line_stderr() -> None:
    """For a command line's process (never a library caller's): from now on only the main
    thread writes to stderr (see `_MainThreadStderr`)."""
    sys.stderr = _MainThreadStderr(sys.stderr)


def exit_process(code: int) -> None:
    """Ends a command line with `code`. After a failed restore, orbax's pending work can
    print tracebacks while the interpreter shuts down; an error exit skips the shutdown so
    that the one-line error stays the only output."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(code)
