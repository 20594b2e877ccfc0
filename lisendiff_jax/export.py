"""Exporting a training workdir as a Hugging Face folder plus the LisenDiff modules, and loading
such a folder back.

    python -m lisendiff_jax.export --workdir workdirs/tiny --out exports/tiny [--peft]

The folder holds:
- `config.json`, `generation_config.json` (when the backbone has one), `model.safetensors`:
  the backbone with the LoRA adapters merged into its kernels and the trained LM head, under
  transformers' names and layouts, so `AutoModelForCausalLM.from_pretrained(out)` loads it;
- the tokenizer and its chat template (`tokenizer.save_pretrained`);
- `lisendiff/modules.safetensors`: every parameter of the cross-attention, the style summary and the
  denoisers, and the latent statistics, under our parameter paths (e.g.
  `backbone.layers.3.cross_attn.attn.v_proj.kernel`, `summary.queries`, `latent_mean`);
- `lisendiff/config.json`: the run's config (module shapes, diffusion schedule, S-Encoder,
  prompt length), the latent width, alpha_bar_T and where the weights came from;
- with `--peft`, `peft/`: the LoRA adapters (and trained LM head) as a PEFT adapter for the
  original backbone.

`load_exported` rebuilds the same merged model `restore.load_workdir` gives, with the same
weights bit for bit, so both sample identically for the same seed. A run on a quantized base
(`model.base_quantization`) is exported merged and de-quantized, in the backbone's parameter
dtype: its workdir samples on the quantized base with the adapters unmerged, close to the
export but not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from lisendiff_jax.backbone.layout import PROJECTIONS
from lisendiff_jax.backbone.loading import path_to_hf_key, read_safetensors, write_safetensors
from lisendiff_jax.errors import UserError
from lisendiff_jax.files import staged_folder
from lisendiff_jax.infer.restore import (
    Loaded,
    build_model,
    checkpoint_step,
    command_line_stderr,
    exit_process,
    for_inference,
    load_tokenizer,
    restore_workdir,
)
from lisendiff_jax.method.lora import LoRALinear, merge_lora
from lisendiff_jax.method.model import TRAINABLE_MODULES, LatentStat, LisenDiff
from lisendiff_jax.tiny import backbone_folder

# In a subfolder: the backbone loader reads every *.safetensors file at the top level.
MODULES_FILE = "lisendiff/modules.safetensors"
MODULES_CONFIG = "lisendiff/config.json"
EXPORT_FORMAT = 1


class ExportError(UserError, ValueError):
    """An export folder that cannot be written or read; the message names the file."""


def _entry(name: str, value: jax.Array, transpose: bool = False):
    shape = tuple(value.shape[::-1]) if transpose else tuple(value.shape)
    fetch = (lambda: np.asarray(value).T) if transpose else (lambda: np.asarray(value))
    return name, (shape, np.dtype(value.dtype)), fetch


def _is_module_variable(path: tuple, variable: object) -> bool:
    """The LisenDiff modules' parameters and the latent statistics."""
    if isinstance(variable, LatentStat):
        return True
    return isinstance(variable, nnx.Param) and any(p in TRAINABLE_MODULES for p in path)


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _backbone_entries(model: LisenDiff):
    """The merged backbone's parameters under transformers' names (cross-attention excluded)."""
    state = nnx.state(model.backbone, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        if "cross_attn" in path:
            continue
        name, transpose = path_to_hf_key(path)
        yield _entry(name, variable[...], transpose)


def _peft_entries(model: LisenDiff):
    for i, layer in enumerate(model.backbone.layers):
        for proj, (block, *_) in PROJECTIONS.items():
            lora = getattr(getattr(layer, block), proj)
            if isinstance(lora, LoRALinear):
                prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
                # torch Linear layout [out, in]: A [in, r] -> [r, in], B [r, out] -> [out, r].
                yield _entry(f"{prefix}.lora_A.weight", lora.lora_a[...], transpose=True)
                yield _entry(f"{prefix}.lora_B.weight", lora.lora_b[...], transpose=True)
    if model.train_lm_head:
        yield _entry("base_model.model.lm_head.weight", model.backbone.lm_head.kernel[...], True)


def write_peft_adapter(
    model: LisenDiff, config: ml_collections.ConfigDict, base: str, out: Path
) -> None:
    """The LoRA adapters (unmerged) as a PEFT adapter folder for the backbone `base`."""
    out.mkdir(parents=True, exist_ok=True)
    lora = config.model.lora
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "modules_to_save": ["lm_head"] if model.train_lm_head else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    write_safetensors(out / "adapter_model.safetensors", _peft_entries(model))


def _hf_config(folder: Path, dtype: np.dtype) -> dict:
    config = json.loads((folder / "config.json").read_text())
    name = "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else str(dtype)
    config["dtype"] = name  # transformers 5; 4.x reads torch_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return config


def export(
    workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None, peft: bool = False
) -> Path:
    """Writes the export of `workdir`'s checkpoint `step` (default: the newest) to `out`."""
    workdir, out = Path(workdir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new --out")
    step = int(checkpoint_step(workdir, step).name)
    model, config, tokenizer = restore_workdir(workdir, step)
    with staged_folder(out) as staging:
        _write(
            model,
            config,
            tokenizer,
            staging,
            peft,
            source={"workdir": str(workdir.resolve()), "step": step},
        )
    return out


def _write(model: LisenDiff, config, tokenizer, out: Path, peft: bool, source: dict) -> None:
    folder = backbone_folder(config.model.backbone)
    if peft:
        write_peft_adapter(model, config, str(folder), out / "peft")
    # Merged even on a quantized base, which for_inference keeps: an export is float weights.
    merge_lora(for_inference(model).backbone)

    dtype = np.dtype(model.backbone.embed_tokens.embedding.dtype)
    (out / "config.json").write_text(json.dumps(_hf_config(folder, dtype), indent=2))
    if (folder / "generation_config.json").is_file():
        shutil.copy(folder / "generation_config.json", out / "generation_config.json")
    write_safetensors(out / "model.safetensors", _backbone_entries(model))
    tokenizer.save_pretrained(out)

    modules = nnx.to_flat_state(nnx.state(model, _is_module_variable))
    (out / MODULES_FILE).parent.mkdir()
    write_safetensors(out / MODULES_FILE, (_entry(_dotted(p), v[...]) for p, v in modules))
    meta = {
        "format": EXPORT_FORMAT,
        "latent_dim": model.latent_dim,
        "alpha_bar_T": float(model.diffusion.make().alpha_bar_T),
        "source": source,
        "run_config": config.to_dict(),
    }
    (out / MODULES_CONFIG).write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def is_export(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODULES_CONFIG).is_file()


def load_exported(folder: str | os.PathLike, dtype: str | None = None) -> Loaded:
    """The model of an export folder, as `restore.load_workdir` gives it for the workdir."""
    folder = Path(folder)
    path = folder / MODULES_CONFIG
    if not path.is_file():
        raise ExportError(f"{path} not found: not a folder written by lisendiff_jax.export")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: export format {meta.get('format')!r}, expected 1")
    config = ml_collections.ConfigDict(meta["run_config"])
    # Its LoRA starts at zero (B = 0), so merging leaves the exported, merged kernels exact;
    # they are float even when the run's base was quantized (merge_lora de-quantizes).
    model = for_inference(build_model(folder, config, meta["latent_dim"], dtype, quantized=False))
    targets = dict(nnx.to_flat_state(nnx.state(model, _is_module_variable)))
    by_name = {_dotted(p): v for p, v in targets.items()}
    tensors = folder / MODULES_FILE
    if not tensors.is_file():
        raise ExportError(f"{tensors} not found")
    filled = set()
    for name, array in read_safetensors(tensors):
        variable = by_name.get(name)
        if variable is None or variable.shape != array.shape:
            expected = "no such parameter" if variable is None else f"expected {variable.shape}"
            raise ExportError(f"{tensors}: tensor {name} {array.shape}: {expected}")
        variable.set_value(jax.numpy.asarray(array, variable.dtype))
        filled.add(name)
    missing = sorted(set(by_name) - filled)
    if missing:
        raise ExportError(f"{tensors}: missing {len(missing)} tensor(s), e.g. {missing[0]}")
    return model, config, load_tokenizer(folder)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.export",
        description="Export a training workdir as a Hugging Face folder + LisenDiff modules.",
    )
    p.add_argument("--workdir", required=True, help="training workdir")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--peft", action="store_true", help="also write the LoRA as a PEFT adapter")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax logs at INFO and WARNING while restoring
    try:
        out = export(args.workdir, args.out, args.step, args.peft)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    command_line_stderr()
    exit_process(main())
