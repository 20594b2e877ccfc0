"""The small real experiment: its metrics on cases with known answers, the per-group learning
rate it trains with, decoding from a given latent, and the whole command at tiny sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lisendiff_jax.config import base_config, load_config, validate
from lisendiff_jax.data import Example, sample_path
from lisendiff_jax.experiments import small_real
from lisendiff_jax.experiments.small_real import (
    ExperimentError,
    Measure,
    Stages,
    bootstrap_ci,
    chance_retrieval,
    compare,
    gold_ranks,
    retrieval_measures,
    select_heldout,
)
from lisendiff_jax.infer.inference import InputError, Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.train.step import make_optimizer

# -- metrics -------------------------------------------------------------------------------


def test_gold_ranks_count_the_distractors_closer_to_the_query():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gold = np.array([[2.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    distractors = np.array(
        [
            [[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]],  # gold is the closest: rank 1
            [[0.0, 3.0], [1.0, 1.0], [2.0, 0.0]],  # two closer, one as far (a tie): rank 4
            [[3.0, 3.0], [1.0, 0.0], [0.0, 1.0]],  # one parallel: a tie ranks above, rank 2
        ]
    )
    np.testing.assert_array_equal(gold_ranks(queries, gold, distractors), [1, 4, 2])


def test_recall_and_mrr_of_known_ranks():
    measures = retrieval_measures(np.array([1, 2, 6, 11]), ks=(1, 5, 10))
    assert measures["recall@1"].mean() == 0.25
    assert measures["recall@5"].mean() == 0.5
    assert measures["recall@10"].mean() == 0.75
    assert measures["MRR"].mean() == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11) / 4)


def test_chance_is_what_a_uniform_rank_gives():
    chance = chance_retrieval(100, ks=(1, 5, 10))
    assert chance["recall@5"] == 0.05
    assert chance["MRR"] == pytest.approx(5.187377517639621 / 100)  # H_100 / 100
    ranks = np.random.default_rng(0).integers(1, 101, 200_000)
    simulated = retrieval_measures(ranks, ks=(1, 5, 10))
    for name, value in chance.items():
        assert simulated[name].mean() == pytest.approx(value, abs=3e-3)


def test_bootstrap_interval_of_a_mean():
    values = np.random.default_rng(1).normal(3.0, 2.0, 400)
    m = Measure.mean_of(values)
    low, high = bootstrap_ci(m.value, len(values), resamples=4000, seed=0)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))  # the normal approximation
    assert low == pytest.approx(values.mean() - half, abs=0.04)
    assert high == pytest.approx(values.mean() + half, abs=0.04)
    assert bootstrap_ci(m.value, len(values), seed=3) == bootstrap_ci(m.value, len(values), seed=3)
    constant = Measure.mean_of([2.0] * 5)
    assert bootstrap_ci(constant.value, 5) == (2.0, 2.0)


def test_a_measure_is_a_ratio_of_sums_and_compare_pairs_examples():
    nll = Measure(np.array([10.0, 3.0]), np.array([5.0, 1.0]))  # per token: 13 / 6
    assert nll.value() == pytest.approx(13 / 6)  # not the mean of 2 and 3
    assert nll.value(np.array([1, 1])) == 3.0
    np.testing.assert_allclose(nll.per_example(), [2.0, 3.0])
    a = Measure.mean_of([1.0, 2.0, 3.0, 4.0])
    b = Measure.mean_of([0.5, 1.4, 2.6, 3.5])  # a - b: 0.5, 0.6, 0.4, 0.5
    row = compare("m", "x", a, "y", b)
    assert row["difference"] == pytest.approx(0.5)
    assert 0.4 <= row["difference_ci"][0] <= 0.5 <= row["difference_ci"][1] <= 0.6
    assert row["p"] < 0.01  # consistent differences: a paired test sees them
    against_chance = compare("m", "x", a, "chance", 1.0)
    assert against_chance["p"] is None and against_chance["difference"] == 1.5


def _dialogue(i: int, replies: int) -> list[Example]:
    return [
        Example(
            [f"context {i}"],
            f"reply {j} of dialogue {i} has enough words" if j else "Hi",
            "empathy",
            "en",
            dialogue_id=f"d{i}",
        )
        for j in range(replies)
    ]


def test_heldout_takes_one_long_reply_per_dialogue_and_others_as_distractors():
    examples = [ex for i in range(8) for ex in _dialogue(i, 3)]
    held = select_heldout(examples, n=5, candidates=4, seed=0)
    ids = [ex.dialogue_id for ex in held.examples]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(ex.response != "Hi" for ex in held.examples)
    for query, distractors in zip(held.examples, held.distractors, strict=True):
        assert len(distractors) == 3 and len(set(distractors)) == 3
        assert query.response not in distractors
        assert not any(f"dialogue {query.dialogue_id[1:]} " in d for d in distractors)
    assert select_heldout(examples, 5, 4, seed=0) == held
    with pytest.raises(ExperimentError, match="--candidates 40"):
        select_heldout(examples, 5, 40, seed=0)


def test_a_stage_runs_once_per_key_and_keeps_its_arrays(tmp_path):
    stages, calls = Stages(tmp_path), []

    def compute():
        calls.append(1)
        return dict(text=["a"], latents=np.arange(6.0).reshape(2, 3))

    first = stages.run("s", dict(n=1, names=("x",)), compute)
    again = stages.run("s", dict(n=1, names=("x",)), compute)  # a tuple reads back as a list
    assert len(calls) == 1 and again["text"] == ["a"]
    np.testing.assert_array_equal(again["latents"], first["latents"])
    stages.run("s", dict(n=2, names=("x",)), compute)  # another key: computed again
    assert len(calls) == 2
    assert Stages(tmp_path).run("s", dict(n=2, names=("x",)), compute)["text"] == ["a"]
    assert len(calls) == 2


# -- training: the twins and the modules' learning rate ------------------------------------


def test_the_twin_configs_differ_in_the_lisendiff_modules_only():
    configs = Path(__file__).resolve().parents[1] / "configs"
    twins = [load_config(configs / f"smollm2_esconv{s}.py") for s in ("", "_lora_only")]
    for config in twins:
        validate(config)
    a, b = (json.loads(c.to_json()) for c in twins)
    assert a["model"].pop("lisendiff") is True and b["model"].pop("lisendiff") is False
    assert a.pop("name") != b.pop("name")
    assert a == b
    assert a["modules_learning_rate"] > a["learning_rate"]


def _first_update(modules_learning_rate: float) -> dict:
    c = base_config()
    c.learning_rate, c.clip_grad_norm = 1e-3, 0.0
    c.modules_learning_rate = modules_learning_rate
    tx = make_optimizer(c, total_steps=10)
    params = {
        "backbone": {"layers": {"0": {"cross_attn": {"w": jnp.ones(3)}, "lora_a": jnp.ones(3)}}},
        "denoisers": {"w": jnp.ones(3)},
    }
    grads = {
        "backbone": {"layers": {"0": {"cross_attn": {"w": jnp.ones(3)}, "lora_a": jnp.ones(3)}}},
        "denoisers": {"w": jnp.ones(3)},
    }
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_modules_learning_rate_scales_only_the_lisendiff_modules():
    same = _first_update(0.0)  # 0: the modules train at learning_rate
    layer = same["backbone"]["layers"]["0"]
    np.testing.assert_allclose(layer["cross_attn"]["w"], layer["lora_a"])
    faster = _first_update(1e-2)
    layer = faster["backbone"]["layers"]["0"]
    np.testing.assert_allclose(layer["lora_a"], same["backbone"]["layers"]["0"]["lora_a"])
    np.testing.assert_allclose(layer["cross_attn"]["w"], 10 * layer["lora_a"], rtol=1e-6)
    np.testing.assert_allclose(faster["denoisers"]["w"], 10 * layer["lora_a"], rtol=1e-6)


# -- decoding from a given latent ----------------------------------------------------------


def test_a_listener_decodes_from_given_latents(tiny_workdir):
    listener = Listener(*load_workdir(tiny_workdir, dtype="float32"))
    requests = [Request(("I lost my job.",), seed=1), Request(("My cat is sick.",), seed=2)]
    greedy = Options(temperature=0.0, max_tokens=6)
    reseeded = [Request(r.context, seed=r.seed + 10) for r in requests]
    other = listener.reply(reseeded, greedy)
    latents = np.stack([r.latent for r in other])
    # Seeds 11 and 12's latents, given to a call whose own would come from seeds 1 and 2;
    # greedy decoding then depends on the latent alone.
    given = listener.reply(requests, greedy, batch_size=1, latents=latents)  # row by row
    for a, b in zip(given, other, strict=True):
        assert a.text == b.text
        np.testing.assert_allclose(a.latent, b.latent)
    sampled = listener.reply(requests, greedy)
    assert not np.allclose(np.stack([r.latent for r in sampled]), latents)
    with pytest.raises(InputError, match="latents must be"):
        listener.reply(requests, greedy, latents=latents[:1])


# -- the whole experiment at tiny sizes ----------------------------------------------------

TINY = [
    "--backbone", "tiny",
    "--train", str(sample_path("esconv")), "--train-format", "esconv",
    "--heldout", str(sample_path("empathetic_dialogues")),
    "--heldout-format", "empathetic_dialogues",
    "--steps", "1",
    "--set", "model.cross_attention.last_n_layers=2",
    "--set", "data.max_length=128",
    "--set", "batch_size=8",
    "--contexts", "4", "--candidates", "4", "--foreign-per-lang", "1",
    "--max-tokens", "4", "--batch-size", "4",
]  # fmt: skip


def _check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert math.isfinite(row["value"]) and math.isfinite(row["difference"])
        low, high = row["ci"]
        assert low <= high
        assert row["p"] is None or 0 <= row["p"] <= 1
        question = row["metric"][0]
        if question in "12":
            assert row["value"] > 0 and row["baseline_value"] > 0  # NLL per token
        elif question == "3":
            assert 0 <= row["value"] <= 1 and 0 <= row["baseline_value"] <= 1
        else:
            assert -1 <= row["value"] <= 1 and -1 <= row["baseline_value"] <= 1


def test_runs_trains_only_the_named_twins(tmp_path, monkeypatch):
    trained, evaluated = [], []

    def fake_train(configs, out):
        trained.append(list(configs))
        return [out / "runs" / name for name in configs]

    monkeypatch.setattr(small_real, "train_twins", fake_train)
    monkeypatch.setattr(
        small_real, "evaluate", lambda workdirs, *a, **k: evaluated.append(workdirs) or {}
    )
    monkeypatch.setattr(small_real, "markdown", lambda report: "")
    out = tmp_path / "sr"
    assert small_real.main([*TINY, "--out", str(out), "--runs", "lisendiff"]) == 0
    assert trained == [["lisendiff"]] and evaluated == [[out / "runs" / "lisendiff"]]
    assert small_real.main([*TINY, "--out", str(out)]) == 0
    assert trained[-1] == ["lisendiff", "lora_only"]


def test_the_experiment_end_to_end_and_its_cached_stages(tmp_path, capsys):
    out = tmp_path / "sr"
    assert small_real.main([*TINY, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [s["kind"] for s in report["systems"]] == ["lisendiff", "lora_only", "base"]
    rows = report["rows"]
    _check_rows(rows)
    questions = {row["metric"][0] for row in rows}
    assert questions == set("12345")
    baselines = {(row["metric"][0], row["baseline"]) for row in rows}
    assert {("1", "lora_only"), ("1", "base"), ("2", "lora_only"), ("4", "lora_only")} <= baselines
    assert {("3", "last context turn"), ("3", "mean training latent"), ("3", "chance")} <= baselines
    assert {("5", "lora_only, no latent")} <= baselines
    assert all(row["n"] == 4 for row in rows if row["metric"][0] in "1234")
    langs = {row["metric"].rsplit(" ", 1)[1] for row in rows if row["metric"][0] == "5"}
    assert langs == {"ja", "zh", "yue", "all"}
    assert (out / "latent_map.png").stat().st_size > 0
    assert "| 3. MRR of the gold among 4 | lisendiff |" in (out / "results.md").read_text()

    # Again, as the evaluation entry on the trained workdirs: every stage is reused.
    stages = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    workdirs = [str(out / "runs" / name) for name in ("lisendiff", "lora_only")]
    evaluate = ["evaluate", "--workdirs", *workdirs, "--out", str(out)]
    keep = TINY[TINY.index("--heldout") : TINY.index("--steps")] + TINY[TINY.index("--contexts") :]
    assert small_real.main([*evaluate, *keep, "--no-base"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == stages
    again = json.loads((out / "results.json").read_text())
    assert [s["kind"] for s in again["systems"]] == ["lisendiff", "lora_only"]
    assert all(row["baseline"] != "base" for row in again["rows"])
    _check_rows(again["rows"])


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    args = ["--train", str(tmp_path / "missing.jsonl"), "--heldout", "x", "--out", str(tmp_path)]
    assert small_real.main([*args, "--backbone", "tiny"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert small_real.main([*TINY, "--out", str(tmp_path), "--candidates", "1"]) == 1
    assert "--candidates" in capsys.readouterr().err
    assert small_real.main([*TINY, "--out", str(tmp_path), "--set", "model.lisendiff=false"]) == 1
    assert "--set model.lisendiff" in capsys.readouterr().err


# -- the diffusion probe -------------------------------------------------------------------


def test_probe_context_features_are_last_previous_and_mean_turns():
    from lisendiff_jax.experiments.diffusion_probe import context_features

    context = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # [N=2, n_ctx=3, d=2]
    mask = np.array([[True, True, False], [True, False, False]])
    features = context_features(context, mask)
    np.testing.assert_array_equal(features[0], [2, 3, 0, 1, 1, 2])  # last, previous, mean
    np.testing.assert_array_equal(features[1], [6, 7, 6, 7, 6, 7])  # one turn: all three


def test_probe_ridge_recovers_a_linear_map():
    from lisendiff_jax.experiments.diffusion_probe import ridge

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(200, 5)), rng.normal(size=(5, 3))
    fitted = ridge(x, x @ w + 0.5, penalty=1e-9)
    np.testing.assert_allclose(fitted[:5], w, atol=1e-6)
    np.testing.assert_allclose(fitted[5], 0.5, atol=1e-6)  # the intercept row


def test_the_diffusion_probe_end_to_end(tmp_path, capsys):
    from lisendiff_jax.experiments import diffusion_probe

    args = TINY[TINY.index("--train") : TINY.index("--steps")]  # the data options
    out = tmp_path / "probe.json"
    common = [*args, "--contexts", "4", "--candidates", "4", "--samples", "2"]
    assert (
        diffusion_probe.main([*common, "--steps", "3", "--batch-size", "2", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["examples_seen"] == 6 and report["heldout"] == 4
    assert set(report["retrieval"]) >= {
        "sampled latent (DDPM)",
        "last context turn",
        "mean training latent",
        "ridge regression from the context",
        "chance",
    }
    for measures in report["retrieval"].values():
        assert all(0 <= v <= 1 for v in measures.values())
    assert math.isfinite(report["heldout_loss"]) and report["heldout_loss"] > 0
    assert "| last context turn |" in capsys.readouterr().out
    assert diffusion_probe.main([*common, "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err
