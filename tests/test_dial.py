"""The empathy dial and classifier-free guidance on the context: the dial's mix is exact at its
ends and its ends are the plain styles, g = 1 is no guidance, the dial moves the
latent along the empathy direction, context dropout trains a null summary (and p = 0 builds
none), and bad values are one-line errors naming the field or option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_checkpoints import make_checkpoint

from lisendiff_jax.config import ConfigError, base_config, validate
from lisendiff_jax.data.example import STYLES
from lisendiff_jax.infer.inference import InputError, Listener, Options, Request, sample_latents
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.method.denoiser import DenoiserConfig, StyleDenoisers
from lisendiff_jax.method.diffusion import LatentStats, make_schedule
from lisendiff_jax.method.model import split_for_training, training_loss
from lisendiff_jax.method.sampler import make_plan, sample, steered
from lisendiff_jax.method.summary import StyleSummary

ROOT = Path(__file__).resolve().parents[1]

D, L, BATCH = 8, 2, 4
EMPATHY, DEFAULT = STYLES.index("empathy"), STYLES.index("default")


class Modules(nnx.Module):
    """What `sample_latents` reads of a LisenDiff model, at toy sizes."""

    def __init__(self, null_summary: bool = False, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.summary = StyleSummary(2, 2, D, num_heads=2, null_summary=null_summary, rngs=rngs)
        self.denoisers = StyleDenoisers(2, DenoiserConfig(d_enc=D, num_heads=2), rngs=rngs)
        self.num_latents, self.latent_dim = L, D

    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(mean=jnp.full((D,), 0.5), scale=jnp.asarray(2.0))


def inputs(seed: int = 0):
    rng = np.random.RandomState(seed)
    context = jnp.asarray(rng.randn(BATCH, 3, D), jnp.float32)
    mask = jnp.asarray(rng.rand(BATCH, 3) < 0.8).at[:, 0].set(True)
    return context, mask, jax.random.split(jax.random.key(seed), BATCH)


PLAN = make_plan(make_schedule("linear", 20), "ddpm")


@jax.jit
def dialled(model, context, mask, empathy, keys, guidance=None):
    return sample_latents(model, context, mask, empathy, keys, PLAN, guidance, True)


@jax.jit
def plain_style(model, context, mask, style_ids, keys):
    """Sampling one style as the model trains it: one summary, the style's denoiser."""
    x = model.summary(context, mask, style_ids)
    denoise = lambda y_t, t: model.denoisers(y_t, t, x, style_ids)
    return sample(denoise, PLAN, model.latent_stats, keys, (L, D), True)


def test_the_dials_mix_is_exact_at_its_ends():
    """At w = 0 and 1 (and g = 1) the mixed prediction is the branch itself, bit for bit."""
    rng = np.random.RandomState(1)
    # Values of mixed magnitudes, where a + w (b - a) would round away from b at w = 1.
    y0 = jnp.asarray(rng.randn(4, BATCH, L, D) * 10.0 ** rng.randint(-8, 3, (4, BATCH, L, D)))
    branches = lambda y_t, t: y0
    y_t, t = y0[0], jnp.zeros((BATCH,), jnp.int32)
    ends = jnp.array([0.0, 1.0, 1.0, 0.0])
    mixed = jax.jit(steered(lambda *_: y0[:2], ends))(y_t, t)
    expected = jnp.where(ends[:, None, None] == 1.0, y0[1], y0[0])
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(expected))
    guided = jax.jit(steered(branches, ends, jnp.ones(BATCH)))(y_t, t)
    np.testing.assert_array_equal(np.asarray(guided), np.asarray(expected))


def test_the_dials_ends_are_the_plain_styles():
    """The dial's chain runs both styles batched in one call; the plain style, as training
    runs it, one style alone. XLA may round the two programs differently (it did on an AVX2
    CPU, by 7e-7), so they agree to float32 rounding; exactness of the mix is tested above."""
    model = Modules()
    context, mask, keys = inputs()
    for style, w in ((EMPATHY, 1.0), (DEFAULT, 0.0)):
        expected = plain_style(model, context, mask, jnp.full((BATCH,), style), keys)
        got = dialled(model, context, mask, jnp.full((BATCH,), w), keys)
        for a, b in zip(got, expected, strict=True):  # latents, then every step's y0
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # A batch may mix the ends and the dial between them; each row is its own.
    mixed = dialled(model, context, mask, jnp.array([1.0, 0.0, 0.5, 2.0]), keys)[0]
    empathy = dialled(model, context, mask, jnp.ones(BATCH), keys)[0]
    np.testing.assert_array_equal(np.asarray(mixed[0]), np.asarray(empathy[0]))
    assert not np.allclose(mixed[2], empathy[2]) and not np.allclose(mixed[3], empathy[3])


def test_guidance_one_is_no_guidance():
    """The guided chain at g = 1 is the unguided one. They are two compiled programs, which XLA
    may round differently (the suite's CPU code generator does, by 2e-6), so they agree to
    float32 rounding; the mix itself is exact at g = 1 (tested above)."""
    model = Modules(null_summary=True)
    context, mask, keys = inputs(1)
    w = jnp.array([0.0, 1.0, 0.5, 2.0])
    unguided = dialled(model, context, mask, w, keys)
    guided = dialled(model, context, mask, w, keys, jnp.ones(BATCH))
    for a, b in zip(guided, unguided, strict=True):  # latents, then every step's y0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    pushed = dialled(model, context, mask, w, keys, jnp.full((BATCH,), 3.0))[0]
    assert not np.allclose(pushed, unguided[0], atol=1e-3)


def set_predictions(model: Modules, by_style: dict[int, np.ndarray]) -> None:
    """Makes each style's denoiser predict a constant y0 [D] (standardised space): a zero
    output kernel, the constant as its bias."""
    out = model.denoisers.stacked.out_proj
    out.kernel.set_value(jnp.zeros_like(out.kernel[...]))
    bias = np.zeros(out.bias[...].shape, np.float32)
    for style, y0 in by_style.items():
        bias[style] = y0
    out.bias.set_value(jnp.asarray(bias))


def test_the_dial_moves_the_latent_along_the_empathy_direction():
    model = Modules()
    rng = np.random.RandomState(2)
    y0 = {DEFAULT: rng.randn(D), EMPATHY: rng.randn(D)}
    set_predictions(model, y0)
    context, mask, keys = inputs(2)
    stats = model.latent_stats
    ends = {s: np.asarray(stats.mean) + np.asarray(stats.scale) * v for s, v in y0.items()}
    direction = ends[EMPATHY] - ends[DEFAULT]  # mean empathy latent - mean default latent
    dial = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    along = []
    for w in dial:
        latents = np.asarray(dialled(model, context, mask, jnp.full((BATCH,), w), keys)[0])
        along.append(((latents - ends[DEFAULT]) @ direction / (direction @ direction)).mean())
    np.testing.assert_allclose(along, dial, atol=1e-5)  # w, up to float32 rounding
    assert (np.diff(along) > 0).all()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama_gqa_llama3", folder)  # test_training's tiny Llama
    return folder


def test_training_with_context_dropout_reaches_the_null_summary(checkpoint):
    from test_training import build, random_batch

    _, paper = build(checkpoint)  # p = 0: the paper's model, no null summary to save
    assert paper.summary.null is None and "null" not in nnx.state(paper)["summary"]
    c, model = build(checkpoint, context_dropout=0.5)
    graphdef, trainable, frozen = split_for_training(model)
    assert trainable["summary"]["null"][...].shape == (c.model.summary.num_queries, 16)
    batch = random_batch(np.random.RandomState(0), batch=8)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss = lambda p: training_loss(graphdef, p, frozen, batch, jax.random.key(0))[0]
    grads = jax.jit(jax.grad(loss))(trainable)  # one program, not one per operation
    assert np.abs(np.asarray(grads["summary"]["null"][...])).sum() > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("empathy", float("nan"), "empathy must be finite, got nan"),
        ("empathy", "high", "empathy must be a number, got 'high'"),
        ("guidance", float("inf"), "guidance must be finite, got inf"),
        ("guidance", True, "guidance must be a number, got True"),
    ],
)
def test_bad_dial_or_guidance_values_are_one_line_errors(field, value, message):
    with pytest.raises(InputError) as refused:
        Request(("Hello.",), **{field: value})
    assert str(refused.value) == message


def test_context_dropout_out_of_range_names_the_option():
    c = base_config()
    c.data.sources.mine = dict(format="jsonl", path="x.jsonl", fraction=1.0, split="")
    for p in (1.0, -0.1):
        c.model.denoiser.context_dropout = p
        with pytest.raises(ConfigError, match=r"^--config\.model\.denoiser\.context_dropout: "):
            validate(c)
    c.model.denoiser.context_dropout = 0.1
    validate(c)


@pytest.fixture(scope="module")
def listener(tiny_workdir) -> Listener:
    return Listener(*load_workdir(tiny_workdir, dtype="float32"))


def test_a_requests_dial_and_style_are_one_setting(listener):
    context = ("I lost my job today.", "Oh no!", "They closed my office.")
    requests = [
        Request(context, "empathy", seed=3),
        Request(context, "default", seed=3),
        Request(context, "default", seed=3, empathy=1),  # the dial overrides the style
        Request(context, "empathy", seed=3, empathy=0.0),
        Request(context, seed=3, empathy=2.0),
    ]
    replies = listener.reply(requests, Options(temperature=1.0, top_p=1.0, max_tokens=8))
    for a, b in ((0, 2), (1, 3)):
        assert replies[a].text == replies[b].text
        np.testing.assert_array_equal(replies[a].latent, replies[b].latent)
    assert not np.allclose(replies[4].latent, replies[0].latent)


def test_guidance_on_a_model_trained_without_context_dropout_names_the_option(listener):
    request = Request(("Hello.",), guidance=2)
    message = (
        "guidance 2 needs a model trained with --config.model.denoiser.context_dropout > 0 "
        "(this one has no null context); use guidance 1"
    )
    with pytest.raises(InputError) as refused:
        listener.check(request, Options())
    assert str(refused.value) == message
    with pytest.raises(InputError, match="context_dropout"):
        listener.reply([Request(("Hi.",)), request])


def test_a_workdir_from_before_context_dropout_restores_and_resumes(tiny_workdir, tmp_path):
    from lisendiff_jax.train.loop import _check_workdir_config

    old = tmp_path / "old"
    shutil.copytree(tiny_workdir, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["model"]["denoiser"]["context_dropout"]
    (old / "config.json").write_text(json.dumps(saved))
    model, config, _ = load_workdir(old, dtype="float32")
    assert model.summary.null is None and config.model.denoiser.context_dropout == 0.0
    _check_workdir_config(old, config)  # a resume with today's default (0) trains on
    config.model.denoiser.context_dropout = 0.1
    with pytest.raises(ConfigError, match=r"context_dropout \(0\.0 there, 0\.1 now\)"):
        _check_workdir_config(old, config)


def test_sample_py_takes_the_dial_and_guidance(tiny_workdir, capsys, tmp_path):
    from test_sample_cli import FAST, _one_line_error, run_main

    w = ["--workdir", str(tiny_workdir)]
    assert _one_line_error(capsys, *w, "--context", "hi", "--empathy", "nan") == (
        "error: --empathy must be finite, got nan"
    )
    assert "--config.model.denoiser.context_dropout > 0" in _one_line_error(
        capsys, *w, "--context", "hi", "--guidance", "2", *FAST
    )
    src = tmp_path / "in.jsonl"
    lines = [{"context": ["I lost my keys."], "seed": 4}, {"context": ["x"], "empathy": "lots"}]
    src.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n")
    assert _one_line_error(capsys, *w, "--input", str(src), *FAST) == (
        f"error: {src}:2: empathy must be a number, got 'lots'"
    )
    src.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "empathy": 1}) + "\n")
    code, out, err = run_main(capsys, *w, "--input", str(src), "--json", "--empathy", "0", *FAST)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["empathy"], r["guidance"]) for r in records] == [(0.0, 1.0), (1.0, 1.0)]
    code, out, err = run_main(
        capsys, *w, "--context", "I lost my keys.", "--seed", "4", "--json", *FAST
    )
    assert code == 0, err
    alone = json.loads(out)  # --style empathy, the default: w = 1; alone, so up to rounding
    assert alone["reply"] == records[1]["reply"]
    np.testing.assert_allclose(alone["latent"], records[1]["latent"], atol=1e-5, rtol=1e-5)


def test_the_analysis_map_samples_along_the_dial(listener, tiny_workdir, tmp_path, capsys):
    from lisendiff_jax import analysis

    situations = ["I lost my job today.", "My cat is sick."]
    by_w = analysis.sampled_latents(listener, situations, 1, 0, empathy=(0, 1, 2))
    by_style = analysis.sampled_latents(listener, situations, 1, 0)
    assert list(by_w) == ["w=0", "w=1", "w=2"]
    np.testing.assert_array_equal(by_w["w=0"], by_style["default"])
    np.testing.assert_array_equal(by_w["w=1"], by_style["empathy"])
    file = tmp_path / "situations.jsonl"
    file.write_text(
        "".join(
            json.dumps(dict(id=str(i), lang="zh", polarity="negative", emotion="sad", situation=s))
            + "\n"
            for i, s in enumerate(situations)
        )
    )
    out = tmp_path / "dial.png"
    args = ["map", "--workdir", str(tiny_workdir), "--situations", str(file), "--samples", "1"]
    assert analysis.main([*args, "--empathy", "0,1,2", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        analysis.main([*args, "--empathy", "0,high"])
    assert "--empathy: 'high' is not a number (give e.g. 0,1,2)" in capsys.readouterr().err


def test_the_evaluation_sweeps_the_dial_in_one_simulate_command():
    from lisendiff_jax.evaluation.__main__ import _listeners, parser

    roles = [
        f"--{r}-{k}={v}" for r in ("speaker", "listener") for k, v in (("url", "u"), ("model", "m"))
    ]
    argv = ["simulate", *roles, "--listener-extra", '{"lang": "yue"}', "--system", "ours"]
    args = parser().parse_args([*argv, "--out", "t.jsonl", "--empathy", "0,1,2.5"])
    assert [(name, client.endpoint.extra_body) for name, client in _listeners(args)] == [
        ("ours@w=0", {"lang": "yue", "empathy": 0.0}),
        ("ours@w=1", {"lang": "yue", "empathy": 1.0}),
        ("ours@w=2.5", {"lang": "yue", "empathy": 2.5}),
    ]
    args = parser().parse_args([*argv, "--out", "t.jsonl"])
    assert [(n, c.endpoint.extra_body) for n, c in _listeners(args)] == [("ours", {"lang": "yue"})]
