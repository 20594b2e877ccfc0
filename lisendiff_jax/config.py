"""The schema of an experiment: one locked ConfigDict with every key and its default.

Config files in `configs/` start from `base_config()` (or `paper_config(...)`) and change
values; they cannot add keys, and neither can `--config.key=value` on the command line, so a
typo is an error rather than a silently ignored setting. The one key meant to grow is
`data.sources`: `train.py --source NAME=FORMAT:PATH[:FRACTION]` adds a corpus (`add_source`).
`validate` checks values before any heavy work starts.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections.config_flags import tuple_parser

from lisendiff_jax.backbone.layout import PROJECTIONS, QUANTIZATIONS
from lisendiff_jax.backbone.model import ATTENTION_KERNELS, REMAT_POLICIES
from lisendiff_jax.data.errors import DataError
from lisendiff_jax.data.formatting import SYSTEM_PROMPTS
from lisendiff_jax.data.languages import PromptsFileError, describe, is_language_tag, read_prompts
from lisendiff_jax.data.readers import FORMATS, check_path
from lisendiff_jax.errors import UserError

SCHEDULES = ("constant", "cosine", "linear")
DIFFUSION_SCHEDULES = ("linear", "cosine", "zero_terminal_snr")
LOSS_WEIGHTS = ("uniform", "snr", "min_snr")
LOW_PRECISION_UPDATES = ("stochastic", "nearest", "float32_master")
TRAIN_PROMPTS = ("example", "target", "none")
TINY_BACKBONE = "tiny"


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the option."""


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment has, with the paper's values where the paper gives one."""
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.seed = 0
    # Steps and checkpoints: scripts and tests rely on every config having these two.
    c.num_steps = 0  # 0 = one epoch over the data mix
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 10

    c.batch_size = 1
    c.grad_accum_steps = 1
    c.learning_rate = 1e-4
    # The LisenDiff modules' peak rate (cross-attention, style summary, denoisers), on the same
    # schedule; 0 = learning_rate. They start from nothing, LoRA from the backbone.
    c.modules_learning_rate = 0.0
    c.lr_schedule = "constant"
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.clip_grad_norm = 1.0
    c.optimizer_state_dtype = "float32"  # bfloat16 halves Adam's first moment

    # The device mesh (lisendiff_jax.sharding): sizes of the data, fsdp and tensor axes, one of
    # them -1 for "the remaining devices"; rules move logical axes, e.g. ("vocab=fsdp",).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=()))

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.backbone = "meta-llama/Llama-3.1-8B-Instruct"  # hub id, local folder, or "tiny"
    m.param_dtype = "bfloat16"  # the frozen backbone's weights
    # The decoder layers' frozen projections stored quantized by qwix: "none", "int8", "int4"
    # or "nf4" (backbone/quantized.py); the rest of the backbone keeps param_dtype.
    m.base_quantization = "none"
    m.compute_dtype = "bfloat16"
    m.trainable_dtype = "float32"  # LoRA, cross-attention, summary, denoisers
    # How updates land on trained bf16/fp16 weights (the lm_head, which keeps param_dtype):
    # "stochastic" rounding (no extra memory), "nearest" (small updates vanish), or
    # "float32_master" (a float32 copy in the optimizer state). See train/rounding.py.
    m.low_precision_update = "stochastic"
    m.lisendiff = True  # False: the BaseLLM+L2 baseline (LoRA only)
    m.train_lm_head = True
    m.remat = "full"  # none | full | dots | attention (backbone/model.py, REMAT_POLICIES)
    # The self-attention kernel: auto | einsum | xla | cudnn (backbone/model.py); "auto" is
    # cuDNN flash attention on an NVIDIA GPU in bf16/fp16, the einsum reference elsewhere.
    m.attention = "auto"
    m.lora = ml_collections.ConfigDict(
        dict(rank=16, alpha=32.0, dropout=0.1, targets=("q_proj", "v_proj"))
    )
    # num_latents: L, the latents per example the cross-attention reads (the encoder cache
    # gives 1, the paper's pooled sentence vector). A model setting, not a data one, because it
    # decides which parameters exist (with one latent softmax is 1, so there are no query norm
    # and q/k projections), and restore rebuilds the model from the run's config.
    m.cross_attention = ml_collections.ConfigDict(
        dict(last_n_layers=12, inner_dim=0, num_heads=8, num_latents=1)  # inner_dim 0 = hidden
    )
    m.summary = ml_collections.ConfigDict(dict(num_queries=1, num_heads=8, depth=1, mlp_ratio=4))
    # context_dropout p: training replaces an example's context summary by a learned null
    # summary with probability p, so that sampling can take classifier-free guidance on the
    # context (--guidance); 0 (the paper) builds no null summary.
    m.denoiser = ml_collections.ConfigDict(
        dict(depth=1, num_heads=8, mlp_ratio=4, context_dropout=0.0)
    )
    m.diffusion = ml_collections.ConfigDict(
        dict(
            num_steps=50,
            beta_start=0.001,
            beta_end=0.02,
            schedule="linear",
            loss_weight="uniform",
        )
    )

    c.data = ml_collections.ConfigDict()
    d = c.data
    # Named sources, so each path is one option: --config.data.sources.esconv.path=/data/esconv
    d.sources = ml_collections.ConfigDict()
    d.unit = "dialogues"
    d.target_lang = "zh"  # the reply language at inference: its system prompt is the default
    # System prompts of languages without a built-in one (any language tag, e.g. "ko"): a JSON
    # file of language -> prompt (data/languages.py). Training copies its prompts into
    # `prompt_texts`, which the workdir's config.json keeps, so that a restored or exported run
    # samples with the prompts it trained with after the file is gone or changed.
    d.prompts = ""
    d.prompt_texts = ml_collections.ConfigDict()
    # The system prompt each training example is encoded with. "example": the prompt of the
    # example's own language (Example.lang), so the instruction always agrees with the gold
    # reply; "target": the target language's prompt for every example, which asks for Mandarin
    # over English or Japanese replies and so teaches the model to ignore the instruction that
    # inference relies on; "none": no system message (the chat template's default, if any).
    d.train_prompt = "example"
    d.max_length = 512  # tokens per example, context truncated from the oldest turn
    # Pack several whole examples into each row of max_length tokens (data/batching.py), each
    # attending to its own tokens and latent only: far less padding than one example a row.
    d.packing = False
    d.max_context = 8  # newest context utterances the summary sees
    d.encoder = "sentence-transformers/paraphrase-multilingual-mpnet-base-v2"
    d.encoder_batch_size = 64
    d.cache_dir = ""  # "" = ~/.cache/lisendiff_jax/embeddings
    d.on_error = "raise"  # or "skip": bad rows are counted and reported
    return c


# Model options added after runs were written, each with the value that rebuilds those runs'
# model exactly (no context dropout: no null summary parameter). The attention kernel changes
# no parameter; its default lets runs written before it existed resume unchanged.
ADDED_MODEL_OPTIONS = {
    ("denoiser", "context_dropout"): 0.0,
    ("base_quantization",): "none",
    ("attention",): "auto",
}


def fill_added_model_options(model: dict | ml_collections.ConfigDict | None) -> None:
    """Sets, in place, each of `ADDED_MODEL_OPTIONS` that a run's saved model section lacks
    (a ConfigDict or its JSON dict), so that runs written before an option existed restore
    and resume as they trained."""
    sections = (dict, ml_collections.ConfigDict)
    for (*path, option), value in ADDED_MODEL_OPTIONS.items():
        section = model
        for name in path:
            section = section.get(name) if isinstance(section, sections) else None
        if isinstance(section, sections) and option not in section:
            section[option] = value


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs a config file's `get_config()`, as `train.py --config PATH` does."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"lisendiff_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    return module.get_config()


def check_key(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of option `dotted` (e.g. "model.lora.rank"); ConfigError if there is none."""
    node, walked = config, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean {'.'.join([*walked, close[0]])!r}?)" if close else ""
            raise ConfigError(f"--config.{dotted}: no such option{hint}")
        node, walked = node[part], [*walked, part]
    return node


# The parsers ml_collections' config flags use for these types (absl's for the scalars), so a
# value that passes here is one `--config.key=value` accepts; str options take any text.
_VALUE_PARSERS: dict[type, tuple[flags.ArgumentParser, str]] = {
    bool: (flags.BooleanParser(), "a bool (true or false)"),
    int: (flags.IntegerParser(), "an int"),
    float: (flags.FloatParser(), "a float"),
    tuple: (tuple_parser.TupleParser(), "a tuple (quote it: \"('a', 'b')\")"),
}


def check_value(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Raises ConfigError unless `--config.<dotted>=<text>` parses as the option's type."""
    kind = type(check_key(config, dotted))
    if kind not in _VALUE_PARSERS:
        return
    parser, expected = _VALUE_PARSERS[kind]
    try:
        parser.parse(text)
    except ValueError:
        raise ConfigError(f"--config.{dotted}: {text!r} is not {expected}") from None


def set_value(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets option `dotted` to `text` parsed as `--config.<dotted>=<text>` is (ConfigError
    naming the option if it cannot be), for commands that take overrides without absl."""
    check_value(config, dotted, text)
    parser = _VALUE_PARSERS.get(type(check_key(config, dotted)))
    parent, _, leaf = dotted.rpartition(".")
    node = check_key(config, parent) if parent else config
    node[leaf] = parser[0].parse(text) if parser else text


SOURCE_SPEC = "NAME=FORMAT:PATH[:FRACTION]"


def add_source(config: ml_collections.ConfigDict, spec: str) -> str:
    """Adds the corpus `spec` ("NAME=FORMAT:PATH[:FRACTION]", fraction 1 when left out) to
    `data.sources` as NAME, which --config.data.sources.NAME.* can then change; returns NAME.

    A last ":..." that is not a number belongs to the path (a path with a colon in it).
    """
    where = f"--source {spec}"
    name, _, rest = spec.partition("=")
    format, _, path = rest.partition(":")
    if not name or not format or not path:
        raise ConfigError(f"{where}: expected {SOURCE_SPEC}, e.g. mine=jsonl:/data/mine.jsonl:0.5")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"{where}: NAME {name!r} must be letters, digits and _")
    if name in config.data.sources:
        raise ConfigError(
            f"{where}: the config already has a source {name!r}; change it with "
            f"--config.data.sources.{name}.path=... or pick another NAME"
        )
    if format not in FORMATS:
        raise ConfigError(f"{where}: FORMAT {format!r} is not one of {', '.join(FORMATS)}")
    fraction = 1.0
    head, _, tail = path.rpartition(":")
    if head:
        try:
            fraction, path = float(tail), head
        except ValueError:
            pass
    if not 0 < fraction <= 1:
        raise ConfigError(f"{where}: FRACTION {tail!r} is not in (0, 1]")
    with config.unlocked():
        config.data.sources[name] = source(format, path, fraction)
    return name


def check_data_paths(config: ml_collections.ConfigDict) -> None:
    """The file-system half of `validate`: raises ConfigError naming the option of the first
    source whose path cannot be found."""
    for name, src in config.data.sources.items():
        try:
            check_path(src.format, src.path)
        except DataError as err:
            raise ConfigError(f"--config.data.sources.{name}.path: {err}") from None


def system_prompts(data: ml_collections.ConfigDict) -> dict[str, str]:
    """The run's system prompts by language: the built-in ones, and `data.prompt_texts` over
    them (a workdir from before prompt files has none)."""
    return {**SYSTEM_PROMPTS, **dict(data.get("prompt_texts") or {})}


def load_prompts(config: ml_collections.ConfigDict) -> None:
    """The prompts half of `validate`, which reads a file: copies the `data.prompts` file's
    prompts into `data.prompt_texts` and checks that `data.target_lang` has a prompt. Raises
    ConfigError naming the option, the file and the key."""
    d = config.data
    if d.prompts:
        try:
            texts = read_prompts(d.prompts)
        except PromptsFileError as err:
            raise ConfigError(f"--config.data.prompts: {err}") from None
        for tag, text in texts.items():
            if d.prompt_texts.get(tag, text) != text:
                raise ConfigError(
                    f"--config.data.prompts: {d.prompts}: key {tag!r} differs from the "
                    f"config's data.prompt_texts[{tag!r}]; keep one of them"
                )
        with config.unlocked():
            d.prompt_texts.update(texts)
    if d.target_lang not in system_prompts(d):
        raise ConfigError(
            f"--config.data.target_lang: no system prompt for language {describe(d.target_lang)} "
            f"(have {', '.join(sorted(system_prompts(d)))}); give one in a JSON file of "
            "language -> prompt with --config.data.prompts=FILE"
        )


def source(format: str, path: str, fraction: float, split: str = "") -> ml_collections.ConfigDict:
    """One entry of `data.sources`; `split` "" means the corpus' default (train)."""
    return ml_collections.ConfigDict(dict(format=format, path=path, fraction=fraction, split=split))


def paper_config(backbone: str, l2: str, lisendiff: bool = True) -> ml_collections.ConfigDict:
    """The paper's setting (appendix B) for one backbone and source language L2 ("en" or "ja").

    Data paths are options to fill in (`--config.data.sources.<name>.path=...`): the corpora
    cannot be redistributed.
    """
    c = base_config()
    c.name = f"{backbone.split('/')[-1].lower()}_{l2}{'' if lisendiff else '_lora_only'}"
    c.model.backbone = backbone
    c.model.lisendiff = lisendiff
    # The paper does not give the cross-attention's width; at the full hidden size its 12
    # layers need 7.7 GB of trainable state on an 8B model, which does not fit 24 GB
    # (README, "Memory on one 24 GB GPU"). 1024 wide with 128-dim heads does.
    c.model.cross_attention.inner_dim = 1024
    # Adam's first moment in bf16 saves 1.3 GiB on the 8B models (mostly the trained lm_head).
    c.optimizer_state_dtype = "bfloat16"
    if l2 == "en":
        c.data.sources.daily_dialog = source("daily_dialog", "data/daily_dialog", 0.03)
        c.data.sources.esconv = source("esconv", "data/esconv", 0.10)
    elif l2 == "ja":
        c.data.sources.j_daily_dialog = source("j_daily_dialog", "data/j_daily_dialog", 0.10)
        c.data.sources.j_empathetic_dialogues = source(
            "j_empathetic_dialogues", "data/j_empathetic_dialogues", 0.20
        )
    else:
        raise ConfigError(f"l2 must be 'en' or 'ja', got {l2!r}")
    return c


def _check(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--config.{option}: {message}")


def _one_of(value: object, choices: tuple, option: str) -> None:
    _check(value in choices, option, f"{value!r} is not one of {', '.join(map(str, choices))}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first option whose value cannot work."""
    _check(c.num_steps >= 0, "num_steps", "must be >= 0 (0 = one epoch)")
    _check(c.checkpoint_every > 0, "checkpoint_every", "must be > 0")
    _check(c.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
    _check(c.log_every > 0, "log_every", "must be > 0")
    _check(c.batch_size > 0, "batch_size", "must be > 0")
    _check(c.grad_accum_steps > 0, "grad_accum_steps", "must be > 0")
    _check(c.learning_rate > 0, "learning_rate", "must be > 0")
    _check(
        c.modules_learning_rate >= 0, "modules_learning_rate", "must be >= 0 (0 = learning_rate)"
    )
    _one_of(c.lr_schedule, SCHEDULES, "lr_schedule")
    _check(c.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    _check(c.clip_grad_norm >= 0, "clip_grad_norm", "must be >= 0 (0 = no clipping)")
    _one_of(c.optimizer_state_dtype, ("float32", "bfloat16"), "optimizer_state_dtype")

    sizes = [c.mesh[axis] for axis in ("data", "fsdp", "tensor")]
    _check(
        all(s > 0 or s == -1 for s in sizes) and sizes.count(-1) <= 1,
        "mesh",
        "data, fsdp and tensor must be positive, one of them may be -1 (the remaining devices)",
    )

    m = c.model
    for option in ("param_dtype", "compute_dtype", "trainable_dtype"):
        _one_of(m[option], ("float32", "bfloat16", "float16"), f"model.{option}")
    _one_of(m.remat, REMAT_POLICIES, "model.remat")
    _one_of(m.attention, ATTENTION_KERNELS, "model.attention")
    _check(
        m.attention != "cudnn" or m.compute_dtype in ("bfloat16", "float16"),
        "model.attention",
        "'cudnn' needs model.compute_dtype bfloat16 or float16",
    )
    _one_of(m.base_quantization, QUANTIZATIONS, "model.base_quantization")
    _one_of(m.low_precision_update, LOW_PRECISION_UPDATES, "model.low_precision_update")
    _check(m.lora.rank > 0, "model.lora.rank", "must be > 0")
    _check(0 <= m.lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
    _check(len(m.lora.targets) > 0, "model.lora.targets", "name at least one projection")
    for target in m.lora.targets:
        _one_of(target, PROJECTIONS, "model.lora.targets")
    _check(m.cross_attention.last_n_layers > 0, "model.cross_attention.last_n_layers", "> 0")
    _check(m.cross_attention.inner_dim >= 0, "model.cross_attention.inner_dim", "must be >= 0")
    _check(m.cross_attention.num_heads > 0, "model.cross_attention.num_heads", "must be > 0")
    _check(m.cross_attention.num_latents > 0, "model.cross_attention.num_latents", "must be > 0")
    _check(m.summary.num_queries > 0, "model.summary.num_queries", "must be > 0")
    _check(m.denoiser.depth > 0, "model.denoiser.depth", "must be > 0")
    _check(
        0 <= m.denoiser.context_dropout < 1, "model.denoiser.context_dropout", "must be in [0, 1)"
    )
    _check(m.diffusion.num_steps > 0, "model.diffusion.num_steps", "must be > 0")
    _check(
        0 < m.diffusion.beta_start < m.diffusion.beta_end < 1,
        "model.diffusion.beta_start",
        "need 0 < beta_start < beta_end < 1",
    )
    _one_of(m.diffusion.schedule, DIFFUSION_SCHEDULES, "model.diffusion.schedule")
    _one_of(m.diffusion.loss_weight, LOSS_WEIGHTS, "model.diffusion.loss_weight")

    d = c.data
    _check(len(d.sources) > 0, "data.sources", "name at least one corpus")
    for name, src in d.sources.items():
        _one_of(src.format, FORMATS, f"data.sources.{name}.format")
        _check(bool(src.path), f"data.sources.{name}.path", "is empty")
        _check(0 < src.fraction <= 1, f"data.sources.{name}.fraction", "must be in (0, 1]")
    _one_of(d.unit, ("dialogues", "pairs"), "data.unit")
    _check(
        is_language_tag(d.target_lang),
        "data.target_lang",
        f"{d.target_lang!r} is not a language tag (e.g. 'zh', 'ko')",
    )
    for tag, text in d.prompt_texts.items():
        _check(is_language_tag(tag), f"data.prompt_texts.{tag}", "is not a language tag")
        _check(isinstance(text, str) and bool(text.strip()), f"data.prompt_texts.{tag}", "empty")
    _one_of(d.train_prompt, TRAIN_PROMPTS, "data.train_prompt")
    _check(d.max_length >= 16, "data.max_length", "must be >= 16")
    # Batches are max_length or a power of two long; cuDNN refuses to differentiate masked
    # attention over an odd length ("auto" takes einsum there instead).
    _check(
        m.attention != "cudnn" or d.max_length % 2 == 0,
        "data.max_length",
        f"{d.max_length} is odd: model.attention 'cudnn' trains on even lengths only "
        "(use 'auto', or an even max_length)",
    )
    _check(d.max_context > 0, "data.max_context", "must be > 0")
    _one_of(d.on_error, ("raise", "skip"), "data.on_error")
