"""Filling an abstract Decoder from Hugging Face safetensors, one tensor at a time.

The model is first built with `nnx.eval_shape` (shapes only, no memory); each checkpoint tensor
is then memory-mapped, renamed by the rule table below, transposed where transformers and Flax
disagree on layout, cast, and placed. No PyTorch model is ever built.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lisendiff_jax.backbone.config import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.quantized import QuantizedSlot, quantize_projections, quantized_targets
from lisendiff_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the architecture its config describes."""


# (HF key template, our parameter path template, transpose?). `{name}` matches one key segment.
# torch Linear stores [out, in] and nnx.Linear's kernel is [in, out], hence the transposes.
RULES: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.{norm}_layernorm.weight", "layers.{i}.{norm}_layernorm.scale", False),
    ("model.layers.{i}.{block}.{proj}.weight", "layers.{i}.{block}.{proj}.kernel", True),
    ("model.layers.{i}.{block}.{proj}.bias", "layers.{i}.{block}.{proj}.bias", False),
)
# Buffers some exporters write that carry no parameters.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[A-Za-z0-9_]+)", pattern)
    return re.compile(pattern + "$")


_HF_TO_OURS = tuple((_template_regex(hf), ours, t) for hf, ours, t in RULES)
_OURS_TO_HF = tuple((_template_regex(ours), hf, t) for hf, ours, t in RULES)


def _rewrite(name: str, table) -> tuple[str, bool] | None:
    for regex, template, transpose in table:
        match = regex.match(name)
        if match:
            return template.format(**match.groupdict()), transpose
    return None


def hf_key_to_path(key: str) -> tuple[tuple[str | int, ...], bool] | None:
    """Our parameter path for an HF tensor name, and whether its layout is transposed."""
    rewritten = _rewrite(key, _HF_TO_OURS)
    if rewritten is None:
        return None
    dotted, transpose = rewritten
    return tuple(int(p) if p.isdigit() else p for p in dotted.split(".")), transpose


def path_to_hf_key(path: tuple[str | int, ...]) -> tuple[str, bool]:
    """The HF tensor name for one of our parameter paths, and whether to transpose it."""
    rewritten = _rewrite(".".join(map(str, path)), _OURS_TO_HF)
    if rewritten is None:
        raise KeyError(f"no checkpoint name for parameter {path}")
    return rewritten


# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which JAX ships with).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from one .safetensors file, memory-mapped, no copy."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (bad header)") from None
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        array = np.frombuffer(buf, dtype=dtype, count=count, offset=data_start + begin)
        yield name, array.reshape(info["shape"])


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, tuple[tuple[int, ...], np.dtype], Callable]]
) -> None:
    """Writes (name, (shape, dtype), fetch) entries as one safetensors file, fetching one array
    at a time, so a model larger than host memory never needs to be there all at once."""
    entries, offset = [], 0
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    for name, (shape, dtype), fetch in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        entries.append((shape, dtype, fetch))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape, dtype, fetch in entries:
            array = np.asarray(fetch(), dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor shape {array.shape} != declared {shape}")
            f.write(array.tobytes())  # C order, whatever the array's strides


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those of the shard index, or the single model file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no *.safetensors file (PyTorch .bin checkpoints are not read; "
            "re-save the model with save_pretrained(safe_serialization=True))"
        )
    return files


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id downloaded (config, weights, tokenizer only)."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local}: expected a checkpoint folder, found a file")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_hub_id),
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"],
            )
        )
    except Exception as err:  # hub errors come in many types; all mean "could not get it"
        raise CheckpointError(
            f"{path_or_hub_id}: not a local folder, and fetching it from the Hugging Face hub "
            f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


Sharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def abstract_decoder(
    config: BackboneConfig,
    dtype: str | jnp.dtype,
    compute_dtype: str | jnp.dtype | None,
    quantization: str = "none",
) -> tuple[nnx.GraphDef, nnx.State, dict[tuple, nnx.Variable | QuantizedSlot]]:
    """A shape-only Decoder (no memory) as graph, state and its flat {path: target} map: the
    variables, and with a `quantization` one `QuantizedSlot` per projection kernel."""
    param_dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else param_dtype
    abstract = nnx.eval_shape(
        lambda: quantize_projections(
            Decoder(config, dtype=compute, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
            quantization,
        )
    )
    graphdef, state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(state))
    return graphdef, state, quantized_targets(targets, quantization, param_dtype)


def expected_shape(variable: nnx.Variable, transpose: bool) -> tuple[int, ...]:
    """The shape the checkpoint stores for `variable` (torch layout when `transpose`)."""
    return tuple(variable.shape[::-1] if transpose else variable.shape)


def place(
    variable: nnx.Variable | QuantizedSlot,
    tensor: np.ndarray,
    transpose: bool,
    sharding: Sharding | None,
    path: tuple[str | int, ...],
    where: str,
) -> None:
    """Sets one abstract variable from a checkpoint tensor, in the variable's dtype; `where`
    ("FILE: tensor NAME") names it in the error for a wrong shape. A `QuantizedSlot`
    quantizes the tensor as it lands, so only this one tensor is ever held in float."""
    expected = expected_shape(variable, transpose)
    if tensor.shape != expected:
        raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, expected {expected}")
    dtype = variable.dtype
    if sharding is None:
        value = jnp.asarray(tensor)  # transposed and cast on the device, not in NumPy
        value = (value.T if transpose else value).astype(dtype)
    else:
        tensor = tensor.T if transpose else tensor
        placement = sharding(".".join(map(str, path)), tensor.shape)
        value = jax.make_array_from_callback(
            tensor.shape, placement, lambda index: np.asarray(tensor[index]).astype(dtype)
        )
    if isinstance(variable, QuantizedSlot):
        variable.set_value(value, sharding, ".".join(map(str, path)))
    else:
        variable.set_value(value)


def lacking_error(source: str | os.PathLike, names: list[str]) -> CheckpointError:
    """The error for a checkpoint that lacks the tensors `names` (in its own naming)."""
    return CheckpointError(
        f"{source}: checkpoint lacks {len(names)} tensor(s) the config needs: "
        f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
    )


def load_backbone(
    path_or_hub_id: str | os.PathLike,
    dtype: str | jnp.dtype = "float32",
    compute_dtype: str | jnp.dtype | None = None,
    sharding: Sharding | None = None,
    quantization: str = "none",
) -> Decoder:
    """A Decoder with the checkpoint's weights in `dtype`, computing in `compute_dtype`.

    The checkpoint is a Hugging Face folder or hub id, or a `.gguf` file (see
    `lisendiff_jax.backbone.gguf`). `compute_dtype` defaults to `dtype`; logits and attention
    softmax are float32 either way. `sharding(path, shape)`, when given, places each tensor
    (path like "layers.0.mlp.up_proj.kernel") as it is read: each device receives only its own
    piece, read from the memory-mapped file, so no device or host ever holds the whole model.
    `quantization` ("int8", "int4", "nf4"; see `backbone.quantized`) stores the decoder layers'
    projections quantized, each quantized from its `dtype` value as it is read.
    """
    if Path(path_or_hub_id).suffix.lower() == ".gguf":
        from lisendiff_jax.backbone.gguf import load_gguf

        return load_gguf(path_or_hub_id, dtype, compute_dtype, sharding, quantization)
    folder = resolve_checkpoint(path_or_hub_id)
    config = BackboneConfig.from_pretrained(folder)
    graphdef, state, targets = abstract_decoder(config, dtype, compute_dtype, quantization)
    filled: set[tuple] = set()
    for file in safetensors_files(folder):
        for name, tensor in read_safetensors(file):
            if any(p.match(name) for p in IGNORED):
                continue
            mapped = hf_key_to_path(name)
            if mapped is None or mapped[0] not in targets:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some exporters write the tied head out anyway
                raise CheckpointError(f"{file}: unexpected tensor {name} for {config.architecture}")
            path, transpose = mapped
            place(targets[path], tensor, transpose, sharding, path, f"{file}: tensor {name}")
            filled.add(path)
    missing = [path_to_hf_key(p)[0] for p in targets if p not in filled]
    if missing:
        raise lacking_error(folder, missing)
    return nnx.merge(graphdef, state)
