r"""The smallest real reproduction of LisenDiff: a small real LLM, a real corpus, held-out tests.

    python -m lisendiff_jax.experiments.small_real --train esconv_dev.jsonl \
        --heldout esconv_test.jsonl --backbone HuggingFaceTB/SmolLM2-135M-Instruct --out runs/sr
    python -m lisendiff_jax.experiments.small_real evaluate --workdirs runs/sr/runs/lisendiff \
        runs/sr/runs/lora_only --heldout esconv_test.jsonl --out runs/sr_eval

The first form trains LisenDiff and its LoRA-only twin (configs/smollm2_esconv*.py) on the same
examples, steps and seed, then evaluates both and the untrained backbone; the second evaluates
any trained workdirs. Each stage's result is a file in the output folder, written when the
stage ends and keyed by everything it depends on: a rerun skips finished stages (and trainings
resume), a changed setting redoes only what it touches.

The questions, on held-out dialogues (one reply per dialogue, at least `--min-words` words):
1. Does the decoder use the latent? Response NLL per token given the gold latent Enc(y),
   against LoRA-only and the base model, and against the same model given another held-out
   reply's latent (which isolates the latent's content from the modules' extra capacity).
2. Does the inference path help? NLL given the latent sampled from the context (DDPM).
3. Does the diffusion model predict the reply's meaning? The gold reply ranked among
   `--candidates` (the others: replies from other held-out dialogues) by cosine to the sampled
   latent: recall@1/5/10 and MRR, against the last context turn's embedding, the mean
   training latent, and chance.
4. Do the replies say what the latent says? cos(Enc(reply), Enc(gold)) per system.
5. Is the latent language-independent? The model replies in English to the bundled Japanese,
   Mandarin and Cantonese dialogues while reading the embedding z of their own replies;
   cos(Enc(reply), z) against the LoRA-only model's reply to the same context.
6. A t-SNE map of the sampled latents, the gold replies and the last context turns.
`results.md` and `results.json` hold each figure with a 95% bootstrap interval, its baseline,
the difference with its interval, and a paired t-test's p over the held-out examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lisendiff_jax.data import Example, load_pairs, sample_path
from lisendiff_jax.errors import UserError

RECALL_AT = (1, 5, 10)
FOREIGN_LANGS = ("ja", "zh", "yue")
# Bundled dialogues with replies in the foreign languages, in the order they are taken.
FOREIGN_SOURCES = ("jsonl", "j_empathetic_dialogues")
NLL_BATCH = 8


class ExperimentError(UserError, ValueError):
    """Settings or data the experiment cannot run with; the message names the option."""


# -- held-out data -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldOut:
    examples: list[Example]  # the queries: one reply per dialogue
    distractors: list[list[str]]  # per query, replies from other dialogues

    def fingerprint(self) -> str:
        from lisendiff_jax.data.encoder_cache import examples_fingerprint

        digest = hashlib.sha256(examples_fingerprint(self.examples).encode())
        digest.update(json.dumps(self.distractors, ensure_ascii=False).encode())
        return digest.hexdigest()[:16]


def select_heldout(
    examples: Sequence[Example], n: int, candidates: int, seed: int, min_words: int = 5
) -> HeldOut:
    """Up to `n` queries, one per dialogue (so they are independent for the statistics), each
    a reply of >= `min_words` words with some context; for each, `candidates - 1` distinct
    replies of other dialogues as distractors. Seeded."""
    rng = np.random.default_rng(seed)
    eligible: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.context and len(ex.response.split()) >= min_words:
            eligible.setdefault(ex.dialogue_id, []).append(ex)
    dialogues = list(eligible)
    if len(dialogues) < 2:
        raise ExperimentError(
            f"--heldout: {len(dialogues)} dialogue(s) with a reply of >= {min_words} words; "
            "need at least 2"
        )
    chosen = [dialogues[i] for i in rng.permutation(len(dialogues))[:n]]
    queries = [eligible[d][rng.integers(len(eligible[d]))] for d in chosen]
    distractors = []
    for query in queries:
        pool = sorted(
            {
                ex.response
                for d, exs in eligible.items()
                if d != query.dialogue_id
                for ex in exs
                if ex.response != query.response
            }
        )
        if len(pool) < candidates - 1:
            raise ExperimentError(
                f"--candidates {candidates}: only {len(pool)} other held-out replies to rank "
                "against; use fewer candidates or more held-out dialogues"
            )
        distractors.append([pool[i] for i in rng.choice(len(pool), candidates - 1, False)])
    return HeldOut(queries, distractors)


def foreign_examples(per_lang: int) -> list[Example]:
    """Up to `per_lang` bundled replies (with their contexts) in each of FOREIGN_LANGS."""
    taken: list[Example] = []
    count: Counter[str] = Counter()
    for fmt in FOREIGN_SOURCES:
        for ex in load_pairs(fmt, sample_path(fmt)):
            if ex.lang in FOREIGN_LANGS and count[ex.lang] < per_lang:
                taken.append(ex)
                count[ex.lang] += 1
    return taken


# -- metrics (pure) ------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis, broadcasting the others."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def gold_ranks(queries: np.ndarray, gold: np.ndarray, distractors: np.ndarray) -> np.ndarray:
    """Rank [n] (1 = first) of each gold [n, d] among itself and its distractors [n, k, d] by
    cosine to the query [n, d]; a distractor that ties with the gold ranks above it."""
    gold_score = cosine(queries, gold)  # [n]
    other = cosine(queries[:, None, :], distractors)  # [n, k]
    return 1 + np.sum(other >= gold_score[:, None], axis=1)


def retrieval_measures(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[str, np.ndarray]:
    """Per-query values whose means are recall@k and MRR (ranks [n], 1 = first)."""
    ranks = np.asarray(ranks)
    out = {f"recall@{k}": (ranks <= k).astype(np.float64) for k in ks}
    out["MRR"] = 1.0 / ranks
    return out


def chance_retrieval(candidates: int, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Expected recall@k and MRR when the gold's rank is uniform over `candidates` places."""
    out = {f"recall@{k}": min(k, candidates) / candidates for k in ks}
    out["MRR"] = math.fsum(1 / r for r in range(1, candidates + 1)) / candidates
    return out


@dataclasses.dataclass(frozen=True)
class Measure:
    """Per-example numerators and denominators; the figure is sum(num) / sum(den) (a mean
    when every den is 1, the per-token NLL when they are token counts)."""

    num: np.ndarray
    den: np.ndarray

    @classmethod
    def mean_of(cls, values: Sequence[float]) -> Measure:
        values = np.asarray(values, np.float64)
        return cls(values, np.ones_like(values))

    def value(self, index: np.ndarray | None = None) -> float:
        num, den = (self.num, self.den) if index is None else (self.num[index], self.den[index])
        return float(np.sum(num) / max(np.sum(den), 1e-12))

    def per_example(self) -> np.ndarray:
        return self.num / np.maximum(self.den, 1e-12)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over `n` examples resampled with
    replacement (a zero-width interval for one example)."""
    if n < 1:
        raise ValueError("no examples to resample")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def compare(
    metric: str,
    system: str,
    a: Measure,
    baseline: str,
    b: Measure | float,
    seed: int = 0,
) -> dict[str, Any]:
    """One table row: `a`'s figure and interval against baseline `b` (paired per example, or
    a constant such as chance), the difference a - b with its interval, and a paired t-test's
    p over the per-example values (None for a constant baseline)."""
    from lisendiff_jax.evaluation.stats import paired_test

    n = len(a.num)
    row: dict[str, Any] = dict(
        metric=metric,
        system=system,
        n=n,
        value=a.value(),
        ci=list(bootstrap_ci(a.value, n, seed=seed)),
        baseline=baseline,
    )
    if isinstance(b, Measure):
        if len(b.num) != n:
            raise ValueError(f"{metric}: {n} examples against {len(b.num)}")
        row.update(
            baseline_value=b.value(),
            baseline_ci=list(bootstrap_ci(b.value, n, seed=seed)),
            difference=a.value() - b.value(),
            difference_ci=list(bootstrap_ci(lambda i: a.value(i) - b.value(i), n, seed=seed)),
            p=paired_test(a.per_example(), b.per_example()).p if n >= 2 else None,
        )
    else:
        row.update(
            baseline_value=float(b),
            baseline_ci=None,
            difference=a.value() - float(b),
            difference_ci=[bound - float(b) for bound in row["ci"]],
            p=None,
        )
    return row


# -- stages --------------------------------------------------------------------------------


class Stages:
    """Stage results in `folder`: `<name>.json` (with the key it was computed for) and, for
    arrays, `<name>.npz`, written before the JSON, whose presence marks the stage done."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def run(
        self, name: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        path, arrays_path = self.folder / f"{name}.json", self.folder / f"{name}.npz"
        key = json.loads(json.dumps(key))  # as it reads back
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.seconds[name] = saved["seconds"]
                result = saved["result"]
                if arrays_path.is_file():
                    with np.load(arrays_path) as arrays:
                        result.update({k: arrays[k] for k in arrays.files})
                return result
        path.unlink(missing_ok=True)
        started = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - started
        arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
        if arrays:
            np.savez(arrays_path, **arrays)
        plain = {k: v for k, v in result.items() if k not in arrays}
        record = dict(key=key, seconds=seconds, result=plain)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1))
        os.replace(tmp, path)
        self.seconds[name] = seconds
        return result


# -- systems -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    kind: str  # "lisendiff", "lora_only" or "base"
    workdir: Path | None  # None: the untrained backbone
    step: int | None  # the checkpoint evaluated
    backbone: str

    def key(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), workdir=str(self.workdir))


def describe_systems(
    workdirs: Sequence[str | os.PathLike], with_base: bool = True, backbone: str | None = None
):
    """The systems of `workdirs` (and the base model: `backbone`, by default the first run's),
    and the first run's config, whose data settings (prompt length, context, encoder) every
    system is evaluated with."""
    from lisendiff_jax.infer.restore import checkpoint_step, read_run_config

    if not workdirs:
        raise ExperimentError("--workdirs: name at least one training workdir")
    systems, configs = [], []
    for workdir in workdirs:
        workdir = Path(workdir).absolute()
        config = read_run_config(workdir)
        step = int(checkpoint_step(workdir).name)
        kind = "lisendiff" if config.model.lisendiff else "lora_only"
        name = workdir.name
        while name in {s.name for s in systems} or name == "base":
            name += "'"
        systems.append(System(name, kind, workdir, step, config.model.backbone))
        configs.append(config)
    if with_base:
        systems.append(System("base", "base", None, None, backbone or systems[0].backbone))
    return systems, configs[0]


def reference(systems: Sequence[System]) -> System | None:
    """The system LisenDiff is compared with: the first LoRA-only run, else the base."""
    for kind in ("lora_only", "base"):
        for s in systems:
            if s.kind == kind:
                return s
    return None


# -- model work ----------------------------------------------------------------------------


@functools.cache
def _nll_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lisendiff_jax.method.objectives import token_nll

    @functools.partial(jax.jit, static_argnames=("graphdef",))
    def response_nll(graphdef, state, batch, latents):
        model = nnx.merge(graphdef, state)
        ids = batch["input_ids"]  # [B, T]
        hidden, _ = model.backbone.hidden_states(ids, batch["attention_mask"], latents=latents)
        weights = batch["loss_mask"][:, 1:].astype(jnp.float32)  # position i predicts i + 1
        head, dtype = model.backbone.head_matrix(), model.backbone.dtype

        def row(h, y, w):  # one example's summed NLL
            return token_nll(h[None], head, y[None], w[None], dtype=dtype)

        return jax.vmap(row)(hidden[:, :-1], ids[:, 1:], weights), weights.sum(axis=1)

    return response_nll


def response_nll(
    model, tokenizer, examples: Sequence[Example], max_length: int, latents: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response NLL [n] and response token counts [n] of each example, encoded as in
    training (its language's system prompt, context cut to `max_length`), the decoder reading
    `latents` [n, L, d] (None: no latent)."""
    from flax import nnx

    from lisendiff_jax.data.batching import collate, length_buckets
    from lisendiff_jax.data.formatting import SYSTEM_PROMPTS, encode_examples

    encoded = encode_examples(tokenizer, examples, SYSTEM_PROMPTS, max_length, progress=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    buckets = length_buckets(max_length)
    graphdef, state = nnx.split(model)
    fn = _nll_fn()
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    for start in tqdm(range(0, len(examples), NLL_BATCH), desc="  NLL", leave=False):
        index = np.arange(start, min(start + NLL_BATCH, len(examples)))
        batch = collate(encoded, index, NLL_BATCH, buckets, pad_id)
        rows = batch.pop("example_index")
        batch.pop("row_mask")
        batch_latents = None if latents is None else np.asarray(latents[rows], np.float32)
        total, count = fn(graphdef, state, batch, batch_latents)
        sums[index] = np.asarray(total)[: len(index)]
        counts[index] = np.asarray(count)[: len(index)]
    return sums, counts


def generate(
    listener,
    examples: Sequence[Example],
    lang: str,
    options,
    batch_size: int,
    latents: np.ndarray | None = None,
    desc: str = "  replies",
) -> tuple[list[str], np.ndarray | None, int]:
    """Replies to the examples' contexts in `lang`, request i seeded `options.seed + i` (so the
    batching does not matter); the latents the decoder read [n, L, d] (LisenDiff); and how
    many contexts were cut to fit the prompt budget."""
    from lisendiff_jax.infer.inference import ContextTruncatedWarning, Request

    requests = [
        Request(context=tuple(ex.context), style=ex.style, lang=lang, seed=options.seed + i)
        for i, ex in enumerate(examples)
    ]
    replies = []
    for start in tqdm(range(0, len(requests), batch_size), desc=desc, leave=False):
        chunk = slice(start, start + batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ContextTruncatedWarning)  # counted below
            replies += listener.reply(
                requests[chunk],
                options,
                batch_size,
                latents=None if latents is None else latents[chunk],
            )
    read = (
        np.stack([r.latent for r in replies]) if replies and replies[0].latent is not None else None
    )
    return [r.text for r in replies], read, sum(r.truncated for r in replies)


@dataclasses.dataclass(frozen=True)
class Settings:
    contexts: int = 100
    candidates: int = 100
    min_words: int = 5
    max_tokens: int = 40
    foreign_per_lang: int = 24
    batch_size: int = 20
    seed: int = 0
    base: bool = True
    heldout_format: str = "jsonl"


def evaluate(
    workdirs: Sequence[str | os.PathLike],
    heldout_path: str | os.PathLike,
    out: str | os.PathLike,
    settings: Settings = Settings(),
    backbone: str | None = None,
) -> dict[str, Any]:
    """Runs every stage missing from `out` and writes results.json, results.md and
    latent_map.png there; returns the results."""
    from lisendiff_jax.data.encoder import make_encoder
    from lisendiff_jax.data.encoder_cache import embed_texts, load_split
    from lisendiff_jax.data.readers import check_path
    from lisendiff_jax.infer.inference import Listener, Options
    from lisendiff_jax.infer.restore import load_base, load_workdir
    from lisendiff_jax.tiny import default_cache_root

    out = Path(out)
    check_path(settings.heldout_format, heldout_path)
    systems, ref_config = describe_systems(workdirs, settings.base, backbone)
    d = ref_config.data
    heldout = select_heldout(
        load_pairs(settings.heldout_format, heldout_path),
        settings.contexts,
        settings.candidates,
        settings.seed,
        settings.min_words,
    )
    foreign = foreign_examples(settings.foreign_per_lang)
    examples = heldout.examples
    print(
        f"held out: {len(examples)} replies from {heldout_path}; "
        f"{len(foreign)} foreign-language replies"
    )
    encoder = make_encoder(d.encoder)
    cache_dir = d.cache_dir or default_cache_root() / "embeddings"

    def embed(texts: Sequence[str]) -> np.ndarray:
        return embed_texts(encoder, list(texts), cache_dir, d.encoder_batch_size, progress=False)

    stages = Stages(out / "stages")
    common = dict(
        heldout=heldout.fingerprint(),
        seed=settings.seed,  # the latents' noise
        max_length=d.max_length,
        max_context=d.max_context,
        encoder=encoder.identity,
    )
    options = Options(seed=settings.seed, temperature=0.0, max_tokens=settings.max_tokens)
    gold = embed([ex.response for ex in examples])  # [n, d]
    z_foreign = embed([ex.response for ex in foreign])[:, None, :]  # [m, 1, d]
    ref = reference(systems)
    results: dict[str, dict[str, Any]] = {}
    for system in tqdm(systems, desc="systems"):
        keys = {
            "replies": dict(common, system=system.key(), max_tokens=settings.max_tokens),
            "nll": dict(common, system=system.key()),
            "foreign": dict(
                common,
                system=system.key(),
                max_tokens=settings.max_tokens,
                foreign=[[ex.context, ex.response] for ex in foreign],
            ),
        }
        loaded: list = []

        def listener(system=system, loaded=loaded):
            """The system's model, loaded on first use (not at all when its stages are done)."""
            if not loaded:
                if system.workdir is None:
                    model, config, tokenizer = load_base(
                        system.backbone, ref_config.model.param_dtype
                    )
                    config.data.max_length = d.max_length  # the runs' prompt budget
                else:
                    model, config, tokenizer = load_workdir(system.workdir)
                loaded.append((model, tokenizer, Listener(model, config, tokenizer, encoder)))
            return loaded[0]

        def replies_stage(system=system, listener=listener):
            _, _, lis = listener()
            texts, latents, cut = generate(lis, examples, "en", options, settings.batch_size)
            result = dict(replies=texts, truncated=cut)
            if latents is not None:
                result["latents"] = latents
            return result

        replies = stages.run(f"replies-{system.name}", keys["replies"], replies_stage)

        def nll_stage(system=system, listener=listener, replies=replies):
            model, tokenizer, _ = listener()
            conditions = {"none": None}
            if system.kind == "lisendiff":
                sampled = replies["latents"]
                gold_latents = np.broadcast_to(gold[:, None, :], sampled.shape)
                conditions = {
                    "gold": gold_latents,
                    "sampled": sampled,
                    # another dialogue's gold reply (queries are one per dialogue)
                    "shuffled": np.roll(gold_latents, 1, axis=0),
                }
            result = {}
            for name, latents in conditions.items():
                sums, counts = response_nll(model, tokenizer, examples, d.max_length, latents)
                result[f"{name}_sum"], result[f"{name}_count"] = sums, counts
            return result

        nll = stages.run(f"nll-{system.name}", keys["nll"], nll_stage)
        entry = dict(system=system, replies=replies, nll=nll)
        if system.kind == "lisendiff" or system == ref:  # question 5 compares these two

            def foreign_stage(system=system, listener=listener):
                _, _, lis = listener()
                z = z_foreign if system.kind == "lisendiff" else None
                texts, _, cut = generate(
                    lis, foreign, "en", options, settings.batch_size, z, "  foreign"
                )
                return dict(replies=texts, truncated=cut)

            entry["foreign"] = stages.run(f"foreign-{system.name}", keys["foreign"], foreign_stage)
        results[system.name] = entry
        loaded.clear()

    rows = _table_rows(
        systems,
        results,
        heldout,
        foreign,
        gold,
        z_foreign[:, 0],
        embed,
        load_split(Path(systems[0].workdir) / "data" / "train").response_latents[:, 0].mean(0),
        settings,
    )
    lisendiff_systems = [s for s in systems if s.kind == "lisendiff"]
    figure = None
    if lisendiff_systems:
        figure = _latent_map(out, stages, lisendiff_systems, results, examples, gold, embed, common)
    report = dict(
        heldout=str(heldout_path),
        systems=[s.key() for s in systems],
        settings=dataclasses.asdict(settings),
        rows=rows,
        latent_map=figure,
        stage_seconds=stages.seconds,
        examples=[
            dict(
                context=ex.context[-2:],
                gold=ex.response,
                **{name: r["replies"]["replies"][i] for name, r in results.items()},
            )
            for i, ex in enumerate(examples[:5])
        ],
    )
    (out / "results.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    (out / "results.md").write_text(markdown(report))
    return report


def _table_rows(
    systems, results, heldout, foreign, gold, z_foreign, embed, mean_latent, settings
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(metric: str, system: str, a: Measure, baseline: str, b: Measure | float) -> None:
        rows.append(compare(metric, system, a, baseline, b, settings.seed))

    def nll(name: str, condition: str) -> Measure:
        r = results[name]["nll"]
        return Measure(r[f"{condition}_sum"], r[f"{condition}_count"])

    def replies_cos(name: str, stage: str, targets: np.ndarray) -> np.ndarray:
        return cosine(embed(results[name][stage]["replies"]), targets)

    ref = reference(systems)
    base = next((s for s in systems if s.kind == "base"), None)
    others = [o for o in dict.fromkeys((ref, base)) if o is not None]  # the baselines
    examples = heldout.examples
    last_turn = embed([ex.context[-1] for ex in examples])
    distractors = embed([t for ds in heldout.distractors for t in ds]).reshape(
        len(examples), settings.candidates - 1, -1
    )
    mean_latent = np.broadcast_to(mean_latent, gold.shape)
    # recall@k is 1 for every ranking once k reaches the number of candidates
    ks = [k for k in RECALL_AT if k < settings.candidates]
    chance = chance_retrieval(settings.candidates, ks)
    baselines = {
        "last context turn": retrieval_measures(gold_ranks(last_turn, gold, distractors), ks),
        "mean training latent": retrieval_measures(gold_ranks(mean_latent, gold, distractors), ks),
    }
    langs = np.array([ex.lang for ex in foreign])
    for s in (s for s in systems if s.kind == "lisendiff"):
        metric = "1. NLL/token, gold latent Enc(y)"
        for o in others:
            add(metric, s.name, nll(s.name, "gold"), o.name, nll(o.name, "none"))
        add(
            metric,
            s.name,
            nll(s.name, "gold"),
            "same, another reply's latent",
            nll(s.name, "shuffled"),
        )
        for o in others:
            add(
                "2. NLL/token, sampled latent",
                s.name,
                nll(s.name, "sampled"),
                o.name,
                nll(o.name, "none"),
            )
        sampled = results[s.name]["replies"]["latents"].mean(axis=1)  # [n, d]
        for measure, values in retrieval_measures(
            gold_ranks(sampled, gold, distractors), ks
        ).items():
            metric = f"3. {measure} of the gold among {settings.candidates}"
            a = Measure.mean_of(values)
            for name, baseline in baselines.items():
                add(metric, s.name, a, name, Measure.mean_of(baseline[measure]))
            add(metric, s.name, a, "chance", chance[measure])
    for s in systems:
        for o in others:
            if o != s and (s.kind == "lisendiff" or o.kind == "base"):
                add(
                    "4. cos(Enc(reply), Enc(gold))",
                    s.name,
                    Measure.mean_of(replies_cos(s.name, "replies", gold)),
                    o.name,
                    Measure.mean_of(replies_cos(o.name, "replies", gold)),
                )
    if ref is None:
        return rows
    ref_cos = replies_cos(ref.name, "foreign", z_foreign)
    for s in (s for s in systems if s.kind == "lisendiff"):
        own = replies_cos(s.name, "foreign", z_foreign)
        for lang in (*FOREIGN_LANGS, "all"):
            keep = langs == lang if lang != "all" else np.ones(len(langs), bool)
            if keep.any():
                add(
                    f"5. cos(Enc(English reply), z), z from {lang}",
                    s.name,
                    Measure.mean_of(own[keep]),
                    f"{ref.name}, no latent",
                    Measure.mean_of(ref_cos[keep]),
                )
    return rows


def _latent_map(out, stages, systems, results, examples, gold, embed, common) -> str:
    from lisendiff_jax.analysis import plot_latent_map, tsne_points

    path = out / "latent_map.png"

    def draw():
        points, labels = [], []
        for s in systems:
            sampled = results[s.name]["replies"]["latents"].mean(axis=1)
            points.append(sampled)
            labels += [f"sampled latent ({s.name})"] * len(sampled)
        points += [gold, embed([ex.context[-1] for ex in examples])]
        labels += ["Enc(gold reply)"] * len(gold) + ["Enc(last context turn)"] * len(gold)
        xy = tsne_points(np.concatenate(points), seed=0)
        plot_latent_map(xy, labels, [ex.style for ex in examples] * len(points), path)
        return dict(path=str(path))

    key = dict(common, systems=[s.key() for s in systems])
    if not path.is_file():
        (out / "stages" / "latent_map.json").unlink(missing_ok=True)
    return stages.run("latent_map", key, draw)["path"]


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table, with its settings and the latent map."""
    lines = [
        f"Held-out: `{report['heldout']}`; systems: "
        + ", ".join(
            f"{s['name']} ({s['kind']}, "
            + (f"step {s['step']})" if s["workdir"] != "None" else f"{s['backbone']})")
            for s in report["systems"]
        ),
        "",
        "| metric | system | value | 95% CI | baseline | baseline value | difference "
        "| 95% CI | p | n |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['metric']} | {r['system']} | {_fmt(r['value'])} | {_fmt_ci(r['ci'])} "
            f"| {r['baseline']} | {_fmt(r['baseline_value'])} | {_fmt(r['difference'])} "
            f"| {_fmt_ci(r['difference_ci'])} | {_fmt(r['p'])} | {r['n']} |"
        )
    lines += [
        "",
        "Intervals: 95% percentile bootstrap over the held-out examples (2,000 resamples); "
        "p: paired t-test of the per-example values. NLL is per response token (sum over "
        "examples / tokens); lower is better.",
    ]
    if report.get("latent_map"):
        lines += ["", f"6. Latent map: `{report['latent_map']}`"]
    return "\n".join(lines) + "\n"


# -- training ------------------------------------------------------------------------------


TWINS = ("lisendiff", "lora_only")


def twin_configs(
    train_path: str,
    backbone: str,
    steps: int | None = None,
    seed: int = 0,
    train_format: str = "jsonl",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """{"lisendiff": config, "lora_only": config}: configs/smollm2_esconv*.py on `train_path`
    and `backbone`, with the same steps, seed and `KEY=VALUE` overrides."""
    from lisendiff_jax.config import set_value, source
    from lisendiff_jax.experiments.configs import smollm2_esconv

    configs = {}
    for name in TWINS:
        c = smollm2_esconv(lisendiff=name == "lisendiff")
        c.model.backbone = backbone
        c.data.sources.esconv = source(train_format, str(train_path), 1.0)
        c.seed = seed
        if steps is not None:
            c.num_steps = steps
        for override in overrides:
            key, sep, text = override.partition("=")
            if not sep:
                raise ExperimentError(f"--set {override}: expected KEY=VALUE")
            if key == "model.lisendiff":
                raise ExperimentError("--set model.lisendiff: the twins differ in it by design")
            set_value(c, key, text)
        configs[name] = c
    return configs


def train_twins(configs: dict[str, Any], out: Path, progress: bool = True) -> list[Path]:
    """Trains each config into `out/runs/<name>` unless its final checkpoint is there for the
    same config (a partial run resumes); returns the workdirs."""
    from lisendiff_jax.checkpoint import CheckpointNotFoundError
    from lisendiff_jax.infer.restore import checkpoint_step
    from lisendiff_jax.train.loop import train

    workdirs = []
    for name, config in configs.items():
        workdir = (out / "runs" / name).absolute()
        saved = workdir / "config.json"
        try:
            done = (
                saved.is_file()
                and json.loads(saved.read_text()) == json.loads(config.to_json())
                and checkpoint_step(workdir).name == str(config.num_steps)
            )
        except CheckpointNotFoundError:
            done = False
        if done:
            print(f"{name}: trained ({workdir}, step {config.num_steps})")
        else:
            print(f"{name}: training {config.num_steps} steps into {workdir}")
            train(config, workdir, progress)
        workdirs.append(workdir)
    return workdirs


# -- command line --------------------------------------------------------------------------


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    s = Settings()
    p.add_argument("--heldout", required=True, help="held-out dialogues (JSONL)")
    p.add_argument("--heldout-format", default=s.heldout_format, help="default: jsonl")
    p.add_argument("--out", type=Path, required=True, help="output folder (stages are cached)")
    p.add_argument("--contexts", type=int, default=s.contexts, help="held-out replies")
    p.add_argument("--candidates", type=int, default=s.candidates, help="retrieval candidates")
    p.add_argument("--min-words", type=int, default=s.min_words, help="shortest held-out reply")
    p.add_argument("--max-tokens", type=int, default=s.max_tokens, help="reply length")
    p.add_argument("--foreign-per-lang", type=int, default=s.foreign_per_lang)
    p.add_argument("--batch-size", type=int, default=s.batch_size, help="replies per batch")
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--no-base", action="store_true", help="leave the untrained backbone out")


def _settings(args: argparse.Namespace) -> Settings:
    for option in ("contexts", "candidates", "max_tokens", "batch_size"):
        if getattr(args, option) < 1:
            raise ExperimentError(f"--{option.replace('_', '-')}: must be >= 1")
    if args.candidates < 2:
        raise ExperimentError("--candidates: must be >= 2 (the gold and a distractor)")
    return Settings(
        contexts=args.contexts,
        candidates=args.candidates,
        min_words=args.min_words,
        max_tokens=args.max_tokens,
        foreign_per_lang=args.foreign_per_lang,
        batch_size=args.batch_size,
        seed=args.seed,
        base=not args.no_base,
        heldout_format=args.heldout_format,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m lisendiff_jax.experiments.small_real"
    if argv[:1] == ["evaluate"]:
        p = argparse.ArgumentParser(prog=f"{prog} evaluate", description="Evaluate workdirs.")
        p.add_argument("--workdirs", nargs="+", required=True, help="training workdirs")
        p.add_argument("--backbone", help="the base model (default: the first run's backbone)")
        _add_eval_options(p)
        args = p.parse_args(argv[1:])
    else:
        p = argparse.ArgumentParser(
            prog=prog,
            description=__doc__.splitlines()[0],
            epilog=f"{prog} evaluate --help: evaluate trained workdirs only.",
        )
        p.add_argument("--train", required=True, help="training dialogues (JSONL)")
        p.add_argument("--train-format", default="jsonl", help="default: jsonl")
        p.add_argument("--backbone", required=True, help="hub id or local folder")
        p.add_argument("--steps", type=int, help="training steps (default: the config's)")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
        )
        p.add_argument(
            "--runs",
            nargs="+",
            choices=TWINS,
            default=list(TWINS),
            help="which twins to train and evaluate (default: both)",
        )
        _add_eval_options(p)
        args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax logs at INFO and WARNING while restoring
    started = time.perf_counter()
    try:
        settings = _settings(args)
        if argv[:1] == ["evaluate"]:
            workdirs = args.workdirs
        else:
            from lisendiff_jax.data.readers import check_path

            check_path(args.train_format, args.train)
            configs = twin_configs(
                args.train, args.backbone, args.steps, args.seed, args.train_format, args.set
            )
            workdirs = train_twins({k: configs[k] for k in args.runs}, args.out)
        report = evaluate(workdirs, args.heldout, args.out, settings, args.backbone)
    except KeyboardInterrupt:
        return 130
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"wrote {args.out / 'results.md'} and results.json")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
