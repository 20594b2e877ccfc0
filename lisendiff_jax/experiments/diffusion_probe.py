"""The diffusion probe: the diffusion half of LisenDiff trained alone, to see what it can learn.

L = L_LM + L_diff, and no gradient crosses between the halves: the style summary and the
denoisers read only encoder vectors (the context's turns and the reply's latent), never the LLM.
So the diffusion half of a run can be trained and evaluated on its own, in seconds to minutes on
a CPU instead of the LLM's hour, with exactly the loss, modules, schedule and latent
standardisation of the run's config. That makes questions about the latent's predictability
cheap to answer: how many examples the denoiser needs, which schedule or loss weighting, whether
it beats simply taking the context's own embeddings.

    python -m lisendiff_jax.experiments.diffusion_probe --train esconv_train.jsonl \\
        --heldout esconv_heldout.jsonl --steps 300 --batch-size 4 \\
        --set model.diffusion.schedule=zero_terminal_snr

It prints (and with `--out` writes as JSON) the retrieval measures of the small real
experiment (`small_real.py`): the gold reply ranked among `--candidates` held-out replies by
cosine to a DDPM-sampled latent, to the mean of `--samples` sampled latents, and to the
denoiser's first prediction (at the chain's first step, from y_T = 0), against the last context
turn, the mean of the context's turns, the mean training latent, a ridge regression from the
context's turns fitted on the training examples, and chance; and the held-out x0 loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lisendiff_jax.errors import UserError
from lisendiff_jax.experiments.small_real import (
    ExperimentError,
    chance_retrieval,
    gold_ranks,
    retrieval_measures,
    select_heldout,
)

RIDGE_PENALTY = 1.0  # on unit-norm sentence vectors; 0.1 to 10 score alike on ESConv


def context_features(context: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[last turn; the turn before; mean of the turns] [N, 3d] from context [N, n_ctx, d] laid
    out oldest first, padded at the end, with mask [N, n_ctx] (each row has >= 1 turn)."""
    count = mask.sum(axis=1)
    rows = np.arange(len(context))
    last = context[rows, count - 1]
    previous = context[rows, np.maximum(count - 2, 0)]
    mean = (context * mask[..., None]).sum(axis=1) / count[:, None]
    return np.concatenate([last, previous, mean], axis=1)


def ridge(features: np.ndarray, targets: np.ndarray, penalty: float) -> np.ndarray:
    """Weights [f + 1, d] of targets ~ [features, 1] @ W, fitted in float64."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
    gram = x.T @ x + penalty * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ targets.astype(np.float64))


def probe(
    train_path: str,
    heldout_path: str,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    batch_size: int | None = None,
    contexts: int = 100,
    candidates: int = 100,
    min_words: int = 5,
    samples: int = 8,
    seed: int = 0,
    train_format: str = "jsonl",
    heldout_format: str = "jsonl",
    work: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the diffusion half of the LisenDiff config of the small real experiment (with
    `overrides`) on every reply with context in `train_path`, and measures it on held-out
    replies chosen as the experiment chooses them. Returns the measures."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lisendiff_jax.data import load_pairs
    from lisendiff_jax.data.encoder import make_encoder
    from lisendiff_jax.data.encoder_cache import embed_texts, examples_fingerprint, prepare_split
    from lisendiff_jax.data.readers import check_path
    from lisendiff_jax.experiments.configs import SMOLLM2
    from lisendiff_jax.experiments.small_real import twin_configs
    from lisendiff_jax.method.diffusion import fit_latent_stats, standardise, x0_loss
    from lisendiff_jax.method.model import DiffusionSettings, context_modules, diffusion_loss
    from lisendiff_jax.method.sampler import make_plan, sample
    from lisendiff_jax.tiny import default_cache_root
    from lisendiff_jax.train.step import make_optimizer

    check_path(train_format, train_path)
    check_path(heldout_format, heldout_path)
    # The LLM is named but never loaded: the diffusion half does not read it.
    configs = twin_configs(train_path, SMOLLM2, steps, seed, train_format, overrides)
    config = configs["lisendiff"]
    config.batch_size = batch_size or config.batch_size
    # The modules' own rate: in the joint run they train at modules_learning_rate.
    config.learning_rate = config.modules_learning_rate or config.learning_rate
    m, d = config.model, config.data
    encoder = make_encoder(d.encoder)
    cache = d.cache_dir or default_cache_root() / "embeddings"
    work = Path(work) if work else default_cache_root() / "diffusion_probe"

    def split(examples):
        examples = [ex for ex in examples if ex.context]
        # One folder per example list, so probes of different data never share one.
        folder = work / examples_fingerprint(examples)[:16]
        return prepare_split(examples, encoder, cache, folder, d.max_context, progress=progress)

    train = split(load_pairs(train_format, train_path))
    heldout = select_heldout(
        load_pairs(heldout_format, heldout_path), contexts, candidates, seed, min_words
    )
    held = split(heldout.examples)
    gold = held.response_latents[:, 0]  # [n, d]
    distractors = np.stack(
        [embed_texts(encoder, texts, cache, progress=False) for texts in heldout.distractors]
    )  # [n, candidates - 1, d]

    latents = train.response_latents  # [N, 1, d]
    stats = fit_latent_stats(latents)
    settings = DiffusionSettings(**m.diffusion.to_dict())
    summary, denoisers = context_modules(
        m, encoder.dim, m.denoiser.context_dropout > 0, jnp.float32, nnx.Rngs(config.seed)
    )
    modules = nnx.List([summary, denoisers])
    optimizer = nnx.Optimizer(modules, make_optimizer(config, config.num_steps), wrt=nnx.Param)
    dropout = float(m.denoiser.context_dropout)

    @nnx.jit
    def train_step(modules, optimizer, batch, rng):
        loss_fn = lambda mods: diffusion_loss(*mods, settings, stats, batch, rng, dropout)
        loss, grads = nnx.value_and_grad(loss_fn)(modules)
        optimizer.update(modules, grads)
        return loss

    rng = np.random.default_rng(config.seed)
    epochs = 1 + config.num_steps * config.batch_size // len(train)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(epochs)])
    key = jax.random.key(config.seed)
    losses = []
    for step in tqdm(range(config.num_steps), desc="diffusion", disable=not progress):
        index = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
        batch = {k: jnp.asarray(v) for k, v in train.take(index).items()}
        batch["row_mask"] = jnp.ones(len(index), bool)
        losses.append(float(train_step(modules, optimizer, batch, jax.random.fold_in(key, step))))

    schedule = settings.make()
    plan = make_plan(schedule)
    context = jnp.asarray(held.context_embeddings)
    mask, style = jnp.asarray(held.context_mask), jnp.asarray(held.style_id)

    @nnx.jit
    def sampled(modules, keys):  # [n, 1, d]
        x = modules[0](context, mask, style)
        denoise = lambda y_t, t: modules[1](y_t, t, x, style)
        return sample(denoise, plan, stats, keys, (1, encoder.dim))[0]

    @nnx.jit
    def first_prediction(modules):  # [n, 1, d], the denoiser's guess from y_T = 0
        x = modules[0](context, mask, style)
        t = jnp.full(style.shape, schedule.num_steps - 1)
        y0 = modules[1](jnp.zeros((len(style), 1, encoder.dim)), t, x, style)
        return y0 * stats.scale + stats.mean

    @nnx.jit
    def heldout_loss(modules):  # mean x0 loss over every step, fixed noise
        x = modules[0](context, mask, style)
        y0 = standardise(stats, jnp.asarray(held.response_latents))
        noise = jax.random.normal(jax.random.key(seed), (schedule.num_steps, *y0.shape))

        def at(t, z):
            tt = jnp.full(style.shape, t)
            abar = schedule.alpha_bars[t]
            pred = modules[1](jnp.sqrt(abar) * y0 + jnp.sqrt(1 - abar) * z, tt, x, style)
            return x0_loss(schedule, pred, y0, tt, weighting=settings.loss_weight)

        return jnp.mean(jax.vmap(at)(jnp.arange(schedule.num_steps), noise))

    n = len(gold)
    draws = [
        np.asarray(sampled(modules, jax.random.split(jax.random.key(seed + i), n)))[:, 0]
        for i in range(samples)
    ]
    ctx, ctx_mask = held.context_embeddings, held.context_mask
    weights = ridge(
        context_features(train.context_embeddings, train.context_mask),
        latents[:, 0],
        RIDGE_PENALTY,
    )
    held_features = context_features(ctx, ctx_mask)
    queries = {
        "sampled latent (DDPM)": draws[0],
        f"mean of {samples} sampled latents": np.mean(draws, axis=0),
        "denoiser's first prediction": np.asarray(first_prediction(modules))[:, 0],
        "last context turn": held_features[:, : encoder.dim],
        "mean of the context's turns": held_features[:, 2 * encoder.dim :],
        "mean training latent": np.broadcast_to(np.asarray(stats.mean), gold.shape),
        "ridge regression from the context": np.concatenate(
            [held_features, np.ones((n, 1))], axis=1
        )
        @ weights,
    }
    retrieval = {
        name: {
            k: float(v.mean())
            for k, v in retrieval_measures(gold_ranks(q, gold, distractors)).items()
        }
        for name, q in queries.items()
    }
    retrieval["chance"] = chance_retrieval(candidates)
    return {
        "config": {k: config.model[k].to_dict() for k in ("diffusion", "summary", "denoiser")},
        "steps": config.num_steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "examples_seen": config.num_steps * config.batch_size,
        "train_examples": len(train),
        "heldout": n,
        "candidates": candidates,
        "train_loss_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "heldout_loss": float(heldout_loss(modules)),
        "retrieval": retrieval,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['steps']} steps x {report['batch_size']} = {report['examples_seen']} examples "
        f"seen of {report['train_examples']}; lr {report['learning_rate']:g}; "
        f"{report['config']['diffusion']}",
        f"x0 loss: training (last 10% of steps) {report['train_loss_last_10pct']:.4f}, "
        f"held out {report['heldout_loss']:.4f}",
        "",
        f"| query ({report['heldout']} held-out replies, {report['candidates']} candidates) "
        "| recall@1 | recall@5 | recall@10 | MRR |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, measures in report["retrieval"].items():
        cells = " | ".join(
            f"{measures[k]:.3f}" for k in ("recall@1", "recall@5", "recall@10", "MRR")
        )
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.experiments.diffusion_probe",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--train", required=True, help="training dialogues")
    p.add_argument("--train-format", default="jsonl")
    p.add_argument("--heldout", required=True, help="held-out dialogues")
    p.add_argument("--heldout-format", default="jsonl")
    p.add_argument("--steps", type=int, help="default: the experiment config's")
    p.add_argument("--batch-size", type=int, help="default: the experiment config's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--contexts", type=int, default=100, help="held-out replies")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--min-words", type=int, default=5)
    p.add_argument("--samples", type=int, default=8, help="latents averaged per reply")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the measures here as JSON")
    args = p.parse_args(argv)
    started = time.perf_counter()
    try:
        for name in ("steps", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ExperimentError(f"--{name.replace('_', '-')}: must be >= 1")
        if args.samples < 1:
            raise ExperimentError("--samples: must be >= 1")
        report = probe(
            args.train,
            args.heldout,
            args.set,
            args.steps,
            args.batch_size,
            args.contexts,
            args.candidates,
            args.min_words,
            args.samples,
            args.seed,
            args.train_format,
            args.heldout_format,
        )
    except KeyboardInterrupt:
        return 130
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown(report))
    if args.out:
        import json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
