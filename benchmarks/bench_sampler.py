"""Latent sampling throughput: the whole DDPM chain in one `lax.scan` vs the same chain as a
Python loop of jitted steps; the empathy dial's chain vs the plain one; and end-to-end replies
per second.

Chain: the paper's sizes by default (d_enc 768, T = 50, one attention block with an MLP of 4x
per denoiser, two styles, one summary query), random weights; the context is 4 utterances.
Both variants run the same plan on the same noise (checked equal) and include the summary and
the noise draw; compilation is excluded (a warm-up run first).

Dial: `sample_latents` (every step runs both styles' denoisers on their own summaries in one
call and mixes them at w) against the plain chain of one style as the model trains it (one
summary, `StyleDenoisers.__call__`), both `sample` with per-row keys, rows alternating styles
(w = 0 or 1, checked equal); the ratio is dial time / plain time.

End to end (`Listener.reply`): tokenising, S-Encoder, summary, chain, KV-cache decoding of
`--new-tokens` tokens (no early stop: EOS is disabled), detokenising. The model is the
embedded default's (tiny Llama, USE-multilingual 512-d) with random LisenDiff modules, or a
trained `--workdir`.

    python benchmarks/bench_sampler.py [--batch 1 64] [--d-enc 768] [--e2e-batch 1 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lisendiff_jax.infer.inference import sample_latents
from lisendiff_jax.method.denoiser import DenoiserConfig, StyleDenoisers
from lisendiff_jax.method.diffusion import LatentStats, make_schedule
from lisendiff_jax.method.sampler import ddpm_plan, denoise_step, draw_noise, run_chain, sample
from lisendiff_jax.method.summary import StyleSummary

N_CTX = 4


def median_seconds(fn, repeats: int) -> float:
    return interleaved_median_seconds([fn], repeats)[0]


def interleaved_median_seconds(fns, repeats: int) -> list[float]:
    """The median time of each of `fns`, timed in turns, so that a load that comes and goes on
    a shared machine weighs on all of them alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # warm-up: compilation
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


class Modules(nnx.Module):
    """The LisenDiff modules the sampler reads (`sample_latents` takes this as a model)."""

    def __init__(self, d_enc: int, rngs: nnx.Rngs):
        self.summary = StyleSummary(2, 1, d_enc, rngs=rngs)
        self.denoisers = StyleDenoisers(2, DenoiserConfig(d_enc=d_enc), rngs=rngs)
        self.num_latents, self.latent_dim = 1, d_enc

    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(mean=jnp.zeros((self.latent_dim,)), scale=jnp.ones(()))


def _setup(d_enc: int, batch: int):
    """The modules split for jit, the paper's DDPM plan, and a batch of random contexts
    [batch, N_CTX, d_enc] with their mask and styles (0 default, 1 empathy, alternating)."""
    graphdef, state = nnx.split(Modules(d_enc, nnx.Rngs(0)))
    plan = ddpm_plan(make_schedule("linear", 50))
    rng = np.random.RandomState(0)
    context = jnp.asarray(rng.randn(batch, N_CTX, d_enc), jnp.float32)
    mask = jnp.ones((batch, N_CTX), bool)
    style = jnp.asarray(np.arange(batch) % 2, jnp.int32)
    return graphdef, state, plan, context, mask, style


def bench_chain(d_enc: int, batch: int, repeats: int) -> tuple[float, float]:
    """(scan latents/s, loop latents/s) for one batch size."""
    graphdef, state, plan, context, mask, style = _setup(d_enc, batch)
    shape = (batch, 1, d_enc)
    key = jax.random.key(0)

    @jax.jit
    def scan_chain(state, key):
        m = nnx.merge(graphdef, state)
        x = m.summary(context, mask, style)
        y, noise = draw_noise(key, plan, shape)
        return run_chain(lambda y, t: m.denoisers(y, t, x, style), plan, y, noise)[0]

    @jax.jit
    def summarise_and_draw(state, key):
        x = nnx.merge(graphdef, state).summary(context, mask, style)
        return (x, *draw_noise(key, plan, shape))

    @jax.jit
    def step(state, x, y, t, c0, ct, sigma, z):
        m = nnx.merge(graphdef, state)
        return denoise_step(lambda y, t: m.denoisers(y, t, x, style), y, t, c0, ct, sigma, z)[0]

    coefs = [
        (plan.timesteps[i], plan.coef_y0[i], plan.coef_yt[i], plan.sigma[i])
        for i in range(plan.num_steps)
    ]

    def loop_chain(state, key):
        x, y, noise = summarise_and_draw(state, key)
        for i, c in enumerate(coefs):
            y = step(state, x, y, *c, noise[i])
        return y

    np.testing.assert_allclose(scan_chain(state, key), loop_chain(state, key), atol=1e-4)
    scan_s = median_seconds(lambda: scan_chain(state, key), repeats)
    loop_s = median_seconds(lambda: loop_chain(state, key), repeats)
    return batch / scan_s, batch / loop_s


def bench_dial(d_enc: int, batch: int, repeats: int) -> tuple[float, float]:
    """(dial latents/s, plain latents/s) for one batch size."""
    graphdef, state, plan, context, mask, style = _setup(d_enc, batch)
    keys = jax.random.split(jax.random.key(0), batch)

    @jax.jit
    def plain(state):
        m = nnx.merge(graphdef, state)
        x = m.summary(context, mask, style)
        denoise = lambda y, t: m.denoisers(y, t, x, style)
        return sample(denoise, plan, m.latent_stats, keys, (1, d_enc))[0]

    @jax.jit
    def dial(state):
        w = style.astype(jnp.float32)
        return sample_latents(nnx.merge(graphdef, state), context, mask, w, keys, plan)[0]

    np.testing.assert_allclose(dial(state), plain(state), atol=1e-4)
    dial_s, plain_s = interleaved_median_seconds(
        [lambda: dial(state), lambda: plain(state)], repeats
    )
    return batch / dial_s, batch / plain_s


def bench_replies(workdir: str | None, batch: int, new_tokens: int, repeats: int) -> float:
    from lisendiff_jax.infer.inference import Listener, Options, Request

    if workdir:
        from lisendiff_jax.infer.restore import load_workdir

        model, config, tokenizer = load_workdir(workdir)
    else:
        model, config, tokenizer = _default_model()
    listener = Listener(model, config, tokenizer)
    listener.eos_ids = (-1,)  # no early stop, so every reply is new_tokens long
    turns = ("I failed my exam today.", "Oh no, what happened?", "I froze and forgot it all.")
    requests = [
        Request(turns[: 1 + i % 3], style=("empathy", "default")[i % 2]) for i in range(batch)
    ]
    options = Options(max_tokens=new_tokens)
    seconds = median_seconds(lambda: listener.reply(requests, options, batch_size=batch), repeats)
    return batch / seconds


def _default_model():
    from lisendiff_jax.config import load_config
    from lisendiff_jax.data.encoder import make_encoder
    from lisendiff_jax.infer.restore import build_model, for_inference, load_tokenizer
    from lisendiff_jax.method.model import LisenDiff
    from lisendiff_jax.tiny import backbone_folder

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    folder = backbone_folder(config.model.backbone)
    dim = make_encoder(config.data.encoder).dim
    model: LisenDiff = for_inference(build_model(folder, config, dim))
    return model, config, load_tokenizer(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--d-enc", type=int, default=768)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-batch", type=int, nargs="*", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--workdir", help="a trained workdir for the end-to-end figures")
    args = p.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({platform.machine()}, jax {jax.__version__})")
    print(f"\nDDPM chain, T = 50, d_enc = {args.d_enc}, median of {args.repeats}")
    print(f"{'batch':>6} {'scan latents/s':>15} {'loop latents/s':>15} {'scan/loop':>10}")
    for batch in args.batch:
        scan, loop = bench_chain(args.d_enc, batch, args.repeats)
        print(f"{batch:>6} {scan:>15,.1f} {loop:>15,.1f} {scan / loop:>9.2f}x")
    print(f"\nempathy dial vs plain chain, T = 50, d_enc = {args.d_enc}, median of {args.repeats}")
    print(f"{'batch':>6} {'dial latents/s':>15} {'plain latents/s':>15} {'dial/plain time':>16}")
    for batch in args.batch:
        dial, plain = bench_dial(args.d_enc, batch, args.repeats)
        print(f"{batch:>6} {dial:>15,.1f} {plain:>15,.1f} {plain / dial:>15.2f}x")
    if args.e2e_batch:
        print(f"\nend to end, {args.new_tokens} new tokens per reply, median of {args.repeats}")
        print(f"{'batch':>6} {'replies/s':>10}")
        for batch in args.e2e_batch:
            rate = bench_replies(args.workdir, batch, args.new_tokens, args.repeats)
            print(f"{batch:>6} {rate:>10.2f}")


if __name__ == "__main__":
    main()
