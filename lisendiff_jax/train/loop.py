"""The training run: data, model and optimizer set up once, then the step loop.

Workdir layout:
    config.json       the run's full config (a resume must keep the `model` and `data` parts),
                      with the prompts file's prompts in data.prompt_texts (config.load_prompts)
    metrics.jsonl     one line per logged step
    tensorboard/      the same as TensorBoard events (when tensorboardX is installed)
    data/train/       the example split's cached embeddings (see encoder_cache)
    <step>/           orbax checkpoints: trainable parameters, optimizer state, latent
                      statistics and RNG key; meta with the data position
Everything a step needs is derived from (seed, step), so a run resumed from a checkpoint
continues exactly as if it had never stopped.

On a mesh (config `mesh`, see sharding.py) parameters, optimizer state and batches are split
over the devices by the logical-axis rules; with several processes (one per host), each feeds
its own rows of every global batch, and process 0 alone writes the workdir's files besides the
checkpoints (which orbax writes from every process).
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lisendiff_jax.backbone import BackboneConfig, load_backbone
from lisendiff_jax.checkpoint import Checkpointer
from lisendiff_jax.config import (
    ConfigError,
    check_data_paths,
    fill_added_model_options,
    load_prompts,
    system_prompts,
    validate,
)
from lisendiff_jax.data import Example, Mix, build_mix, summary_table
from lisendiff_jax.data.batching import (
    DataPosition,
    epoch_order,
    iterate_batches,
    length_buckets,
    packed_steps_per_epoch,
    packing_segments,
)
from lisendiff_jax.data.encoder import make_encoder
from lisendiff_jax.data.encoder_cache import prepare_split
from lisendiff_jax.data.formatting import (
    NoRoomError,
    encode_chat,
    encode_examples,
    system_prompt,
)
from lisendiff_jax.data.languages import describe
from lisendiff_jax.errors import UserError
from lisendiff_jax.method.diffusion import fit_latent_stats
from lisendiff_jax.method.model import LisenDiff, check_settings, split_for_training, training_loss
from lisendiff_jax.sharding import MeshPlan, shard_fn
from lisendiff_jax.tiny import backbone_folder, default_cache_root
from lisendiff_jax.train.step import make_optimizer, make_train_step


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible workdir); nothing good is lost."""


def _check_workdir_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """A resumed run must train the same model on the same data; step counts may change."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    fill_added_model_options(saved.get("model"))
    # Workdirs written before data.train_prompt existed were trained with the target prompt.
    saved.get("data", {}).setdefault("train_prompt", "target")
    saved.get("data", {}).setdefault("prompt_texts", {})
    saved.get("data", {}).setdefault("packing", False)  # unpacked before the option existed
    current = json.loads(config.to_json())
    # The prompts file may move; its prompts (data.prompt_texts, compared) may not change.
    for data in (saved.get("data", {}), current["data"]):
        data.pop("prompts", None)
    for section in ("model", "data"):
        if saved.get(section) != current[section]:
            diff = _first_difference(saved.get(section), current[section], section)
            raise ConfigError(
                f"{path}: this workdir was trained with a different {diff}; "
                "use a new --workdir or the original settings"
            )


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"--config.{where} ({a!r} there, {b!r} now)"


def training_prompts(data: ml_collections.ConfigDict, mix: Mix) -> str | Mapping[str, str] | None:
    """The system prompt(s) `encode_examples` gets for `data.train_prompt` (config.py says
    why), from the run's prompts (`system_prompts`, after `load_prompts`). With "example", a
    selected example in a language without a prompt is a ConfigError naming its source,
    rather than a silent fallback to another prompt."""
    prompts = system_prompts(data)
    if data.train_prompt == "none":
        return None
    if data.train_prompt == "target":
        return system_prompt(data.target_lang, prompts)
    for report in mix.sources:
        langs = {lang for count in report.by_style.values() for lang in count.langs}
        missing = sorted(langs - set(prompts))
        if missing:
            raise ConfigError(
                f"--config.data.sources.{report.name}: language {describe(missing[0])} has no "
                f"system prompt (have {', '.join(sorted(prompts))}); give one in a JSON file "
                "of language -> prompt with --config.data.prompts=FILE, or set "
                "--config.data.train_prompt=target or none"
            )
    return prompts


def data_mix(config: ml_collections.ConfigDict) -> Mix:
    """The examples of the config's `data.sources`, drawn with its seed."""
    d = config.data
    sources = [
        dict(src, name=name, split=src.split or None, on_error=d.on_error)
        for name, src in d.sources.items()
    ]
    return build_mix(sources, config.seed, d.unit)


class MetricsLog:
    """Logged metrics to `metrics.jsonl` in the workdir, and as TensorBoard events in
    `tensorboard/` when tensorboardX is installed (a writer that needs no PyTorch)."""

    def __init__(self, workdir: Path):
        self._file = open(workdir / "metrics.jsonl", "a")  # closed in close()
        self._tensorboard = None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict[str, float]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class Trainer:
    """Builds everything for `config` in `workdir`, restoring the latest checkpoint if any.

    `mesh` overrides the config's `mesh` section (e.g. a plan over some of the devices)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path,
        progress: bool = True,
        mesh: MeshPlan | None = None,
    ):
        validate(config)
        load_prompts(config)
        check_data_paths(config)
        self.primary = jax.process_index() == 0
        self.config, self.progress = config, progress and self.primary
        self.mesh = MeshPlan.from_config(config) if mesh is None else mesh
        if config.batch_size % self.mesh.batch_divisor:
            raise ConfigError(
                f"--config.batch_size: {config.batch_size} rows do not split over the mesh's "
                f"{self.mesh.batch_divisor} data-parallel devices; use a multiple of "
                f"{self.mesh.batch_divisor}, or split the model instead "
                "(--config.mesh.fsdp=1 --config.mesh.tensor=-1)"
            )
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _check_workdir_config(self.workdir, config)
        m, d = config.model, config.data

        # Cheap checks first: the backbone's config and tokenizer, then the data.
        folder = backbone_folder(m.backbone)
        check_settings(BackboneConfig.from_pretrained(folder), m)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not tokenizer.chat_template:
            raise ConfigError(f"--config.model.backbone: {folder} has no chat template")
        mix = data_mix(config)
        if self.primary:
            print(summary_table(mix))
        self.examples: list[Example] = mix.examples
        try:
            self.encoded = encode_examples(
                tokenizer, self.examples, training_prompts(d, mix), d.max_length, self.progress
            )
            # Replies are sampled with the target language's prompt (whatever the training
            # prompts were), so check now that it fits, rather than after training.
            target = system_prompt(d.target_lang, system_prompts(d))
            encode_chat(tokenizer, [""], target, d.max_length)
        except NoRoomError as err:
            raise ConfigError(f"--config.data.max_length: {err}") from None
        encoder = make_encoder(d.encoder)
        cache_dir = d.cache_dir or default_cache_root() / "embeddings"
        prepare = functools.partial(
            prepare_split,
            self.examples,
            encoder,
            cache_dir,
            self.workdir / "data" / "train",
            d.max_context,
            d.encoder_batch_size,
            self.progress,
        )
        # Process 0 encodes and writes the split; the others then find it complete and read it.
        if self.primary:
            self.split = prepare()
        multihost_utils.sync_global_devices("lisendiff_jax: training split prepared")
        if not self.primary:
            self.split = prepare()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.buckets = length_buckets(d.max_length)
        # Packed rows hold up to this many examples (0: one example per row, unpacked).
        self.segments = packing_segments(self.encoded, d.max_length) if d.packing else 0
        if self.primary and self.segments:
            print(f"packing: up to {self.segments} examples in each row of {d.max_length} tokens")

        backbone = load_backbone(
            folder,
            dtype=m.param_dtype,
            compute_dtype=m.compute_dtype,
            sharding=shard_fn(self.mesh),
            quantization=m.base_quantization,
        )
        backbone.remat, backbone.attention = m.remat, m.attention
        seed = config.seed
        model = LisenDiff(backbone, m, encoder.dim, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        model.set_latent_stats(fit_latent_stats(self.split.response_latents))
        graphdef, trainable, frozen = split_for_training(model)
        self.graphdef = graphdef
        self.trainable, self.frozen = self.mesh.place(trainable), self.mesh.place(frozen)
        self.total_steps = config.num_steps or (
            packed_steps_per_epoch(
                self.encoded,
                config.batch_size,
                d.max_length,
                self.segments,
                epoch_order(len(self.encoded), seed, 0),
            )
            if self.segments
            else math.ceil(len(self.examples) / config.batch_size)
        )
        self.tx = make_optimizer(config, max(self.total_steps // config.grad_accum_steps, 1))
        self.shardings = self.mesh.step_shardings(
            self.trainable,
            self.frozen,
            jax.eval_shape(self.tx.init, self.trainable),
            config.batch_size,
        )
        self.opt_state = jax.jit(self.tx.init, out_shardings=self.shardings[2])(self.trainable)
        self.base_key = self.mesh.place(jax.random.key(seed), self.mesh.replicated)
        self.step = 0
        self.position = DataPosition()
        self.stop_requested = False
        self.checkpointer = Checkpointer(self.workdir, keep=config.keep_checkpoints)
        if self.checkpointer.latest_step() is not None:
            self._restore()
        if self.primary:
            (self.workdir / "config.json").write_text(config.to_json(indent=1))
        self._step_fn = make_train_step(
            self.tx,
            functools.partial(training_loss, self.graphdef),
            self.shardings,
            m.low_precision_update,
        )

    # -- checkpoints ---------------------------------------------------------------------
    def _checkpoint_state(self) -> dict:
        return {
            "trainable": self.trainable,
            "opt_state": self.opt_state,
            "latent_stats": self.frozen[0],
            "rng": jax.random.key_data(self.base_key),
        }

    def _restore(self) -> None:
        state, meta = self.checkpointer.restore(self._checkpoint_state())
        self.trainable, self.opt_state = state["trainable"], state["opt_state"]
        self.frozen = (state["latent_stats"], *self.frozen[1:])
        self.base_key = jax.random.wrap_key_data(state["rng"])
        self.step = int(meta["step"])
        self.position = DataPosition.from_dict(meta["data"])
        if self.primary:
            print(f"resumed from {self.workdir / str(self.step)} (step {self.step})")

    def save(self) -> Path:
        """Checkpoints the current step (a no-op when that step is saved already)."""
        if self.checkpointer.latest_step() == self.step:
            return self.workdir / str(self.step)
        meta = {
            "step": self.step,
            "data": self.position.to_dict(),
            "backbone": self.config.model.backbone,
            "num_examples": len(self.examples),
        }
        path = self.checkpointer.save(self.step, self._checkpoint_state(), meta)
        self.checkpointer.wait()
        return path

    def close(self) -> None:
        self.checkpointer.close()

    # -- the loop ------------------------------------------------------------------------
    def batches(self):
        stream = iterate_batches(
            self.encoded,
            self.config.batch_size,
            self.buckets,
            self.pad_id,
            self.config.seed,
            start=self.position,
            segments=self.segments,
        )
        rows, size = self.mesh.process_rows(self.config.batch_size), self.config.batch_size
        for tokens, position in stream:
            # Only this process's rows are read; the global batch is assembled on the mesh.
            local = {k: v[rows] for k, v in tokens.items()}
            local.update(self.split.take(local.pop("example_index")))
            n_tokens = int(np.sum(tokens["attention_mask"]))
            yield {k: self.mesh.global_array(v, size) for k, v in local.items()}, position, n_tokens

    def run(self, until: int | None = None) -> int:
        """Trains up to step `until` (default: the configured total), checkpointing every
        `checkpoint_every` steps. Returns the step reached. A non-finite loss raises
        TrainingError before anything is saved, so the last checkpoint stays the last good one.
        """
        until = self.total_steps if until is None else until
        log = MetricsLog(self.workdir) if self.primary else None
        bar = tqdm(total=until, initial=self.step, desc="training", disable=not self.progress)
        try:
            with self.mesh.active():
                self._loop(until, log, bar)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.step

    def _loop(self, until: int, log: MetricsLog | None, bar: tqdm) -> None:
        c = self.config
        all_finite = jnp.ones((), bool)
        tokens, started = 0, time.perf_counter()
        for batch, position, n_tokens in self.batches():
            if self.step >= until or self.stop_requested:
                break
            rng = jax.random.fold_in(self.base_key, self.step)
            self.trainable, self.opt_state, metrics = self._step_fn(
                self.trainable, self.frozen, self.opt_state, batch, rng
            )
            all_finite = all_finite & jnp.isfinite(metrics["loss"])
            self.step += 1
            self.position = position
            tokens += n_tokens
            bar.update(1)
            due_log = self.step % c.log_every == 0 or self.step == until
            due_save = self.step % c.checkpoint_every == 0
            if (due_log or due_save) and not bool(all_finite):
                raise TrainingError(
                    f"non-finite loss before step {self.step}; stopped without saving "
                    f"(last good checkpoint: {self.checkpointer.latest_step()}). "
                    "Lower --config.learning_rate or check the data."
                )
            if due_log:
                elapsed = time.perf_counter() - started
                record = {k: float(v) for k, v in metrics.items()}
                record.update(step=self.step, tokens_per_s=tokens / max(elapsed, 1e-9))
                if log is not None:
                    log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lm=f"{record['lm_loss']:.3f}",
                    diff=f"{record['diff_loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                tokens, started = 0, time.perf_counter()
            if due_save:
                self.save()


def train(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> Path:
    """Trains to the configured step count and returns the final checkpoint's folder.

    Ctrl-C finishes the step under way, saves a checkpoint and raises KeyboardInterrupt; a
    second Ctrl-C stops at once.
    """
    trainer = Trainer(config, workdir, progress)

    def request_stop(signum, frame):
        trainer.stop_requested = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        trainer.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    path = trainer.save()
    trainer.close()
    if trainer.stop_requested:
        print(f"\ninterrupted at step {trainer.step}: saved {path}; run the same command to resume")
        raise KeyboardInterrupt
    return path
