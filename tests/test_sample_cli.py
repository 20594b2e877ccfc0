"""sample.py: one reply, JSON, JSONL batches, chat, baselines, and one-line errors."""

from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_workdir import make_tiny_workdir

from lisendiff_jax.infer.chat import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-tokens", "8"]  # one set of sampling options, so the jitted reply compiles once


def run_main(capsys, *args: str, default_workdir: Path | None = None):
    code = main([*args], default_workdir=default_workdir)
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_py_end_to_end_with_a_trace(tiny_workdir):
    run = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--workdir", str(tiny_workdir), *FAST]
        + ["--context", "I lost my job. ||| Oh no! ||| They closed the office.", "--trace"]
        + ["--trace-steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 4, run.stdout
    assert [line.split(":")[0] for line in lines[1:]] == ["  t=2", "  t=1", "  t=0"]


def test_json_output_and_a_context_cut_to_fit_with_a_warning(tiny_workdir, capsys):
    story = " ||| ".join(f"This is turn number {i} of a long story." for i in range(40))
    code, out, err = run_main(
        capsys,
        *("--workdir", str(tiny_workdir), "--context", story, "--context", "The end."),
        *("--style", "default", "--lang", "en", "--json", *FAST),
    )
    assert code == 0, err
    record = json.loads(out)
    assert len(record["context"]) == 41 and record["context"][-1] == "The end."
    assert (record["style"], record["lang"], record["truncated"]) == ("default", "en", True)
    assert isinstance(record["reply"], str) and "trace" not in record
    assert len(record["latent"]) == 1 and len(record["latent"][0]) == 512
    assert err.startswith("warning: context cut to fit 256 prompt tokens: kept the newest")
    assert len(err.strip().splitlines()) == 1


def test_jsonl_batch_keeps_order_ids_and_per_request_settings(tiny_workdir, capsys, tmp_path):
    requests = [
        {"id": "a", "context": ["My cat is sick.", "I'm sorry.", "She won't eat."]},
        {"context": "Is the train late? ||| Ten minutes.", "style": "default"},
        {"id": 7, "context": ["我今天很难过。"], "lang": "yue"},
        {"id": "own seed", "context": ["I lost my keys."], "seed": 5},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in requests) + "\n\n")
    base = ["--workdir", str(tiny_workdir), *FAST, "--temperature", "1.0"]
    w = [*base, "--seed", "10"]
    code, out, err = run_main(capsys, *w, "--input", str(src), "--output", str(dst), "--json")
    assert code == 0, err
    assert out == ""
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r.get("id") for r in records] == ["a", None, 7, "own seed"]
    assert [r["seed"] for r in records] == [10, 11, 12, 5]  # --seed plus the place, or its own
    assert [r["style"] for r in records] == ["empathy", "default", "empathy", "empathy"]
    assert [r["lang"] for r in records] == ["zh", "zh", "yue", "zh"]  # the run's language
    assert records[1]["context"] == ["Is the train late?", "Ten minutes."]
    assert all(len(r["latent"][0]) == 512 for r in records)

    # Without --json: text, each reply after its id (or line number) and seed, and no latent.
    code, out, err = run_main(capsys, *w, "--input", str(src))
    assert code == 0, err
    assert out.splitlines() == [
        f"{label}, seed {r['seed']}: {r['reply']}"
        for label, r in zip(['id "a"', "line 2", "id 7", 'id "own seed"'], records, strict=True)
    ]
    code, _, err = run_main(capsys, *w, "--input", str(src), "--output", str(dst))
    assert code == 0, err
    assert "latent" not in json.loads(dst.read_text().splitlines()[0])

    # The echoed seed gives the same reply alone, for a line without a seed too.
    code, out, err = run_main(
        capsys, *base, "--seed", "12", "--json", "--context", "我今天很难过。", "--lang", "yue"
    )
    assert code == 0, err
    assert json.loads(out)["reply"] == records[2]["reply"]


def test_help_documents_the_input_format(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for field in ("context", "id", "style", "lang", "seed"):
        assert f"\n  {field:8} " in out
    assert '"context"' in out and '"seed"' in out  # the example line and the output's fields


def test_chat_keeps_the_conversation(tiny_workdir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("I lost my keys.\n\n/reset\nHello\n/quit\n"))
    code, out, err = run_main(capsys, "--workdir", str(tiny_workdir), "--chat", *FAST)
    assert code == 0, err
    assert out.count("listener> ") == 2


def test_lora_only_and_base_models_sample_without_a_latent(capsys, tmp_path):
    lora_only = make_tiny_workdir(tmp_path / "lora_only", lisendiff=False)
    capsys.readouterr()  # the data summary it printed
    for source in (["--workdir", str(lora_only)], ["--backbone", "tiny", "--dtype", "float32"]):
        code, out, err = run_main(capsys, *source, "--context", "I lost my keys.", "--json", *FAST)
        assert code == 0, err
        record = json.loads(out)
        assert record["latent"] is None and isinstance(record["reply"], str)


def _one_line_error(capsys, *args: str, default_workdir: Path | None = None) -> str:
    code, out, err = run_main(capsys, *args, default_workdir=default_workdir)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_gives_one_line_errors(tiny_workdir, capsys, tmp_path):
    w = ["--workdir", str(tiny_workdir)]
    assert "empty context" in _one_line_error(capsys, *w, "--context", " ||| ")
    assert "nothing to answer" in _one_line_error(capsys, *w)
    assert "not both" in _one_line_error(capsys, *w, "--backbone", "tiny", "--context", "hi")
    message = _one_line_error(capsys, default_workdir=tmp_path / "nope")
    assert "python train.py" in message and "does not exist" in message
    assert "no such workdir" in _one_line_error(
        capsys, "--workdir", str(tmp_path / "x"), "--context", "hi"
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": ["fine"]}\n{"context": []}\n')
    message = _one_line_error(capsys, *w, "--input", str(bad))
    assert message == f"error: {bad}:2: empty context: give at least one non-blank turn"
    bad.write_text('{"context": ["fine"], "seed": "five"}\n')
    assert f"{bad}:1: seed must be an integer" in _one_line_error(capsys, *w, "--input", str(bad))
    bad.write_text('{"context": ["fine"], "lang": "fr"}\n')
    assert f"{bad}:1: no system prompt for language 'fr' (French)" in _one_line_error(
        capsys, *w, "--input", str(bad)
    )
    context_error = (
        r"max_tokens 4090 leaves no room for the (\d+)-token prompt in this model's "
        r"4096-token context; use max_tokens <= (\d+)"
    )
    message = _one_line_error(capsys, *w, "--context", "hi", "--max-tokens", "4090")
    assert re.fullmatch("error: " + context_error, message), message
    # The first line's short prompt leaves room for 4000 tokens, the third's does not.
    bad.write_text('{"context": ["fine"]}\n\n{"context": "I lost my job. ||| Oh no! ||| Why?"}\n')
    message = _one_line_error(capsys, *w, "--input", str(bad), "--max-tokens", "4000")
    assert re.fullmatch(
        f"error: {re.escape(str(bad))}:3: " + context_error.replace("4090", "4000"), message
    ), message
    assert "DDIM steps must be in [2, 50]" in _one_line_error(
        capsys, *w, "--context", "hi", "--sampler", "ddim", "--ddim-steps", "99"
    )


def test_broken_workdirs_give_one_line_errors(tiny_workdir, capsys, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    assert "config.json not found" in _one_line_error(
        capsys, "--workdir", str(no_config), "--context", "hi"
    )
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(tiny_workdir / "config.json", untrained)
    assert "no checkpoint yet" in _one_line_error(
        capsys, "--workdir", str(untrained), "--context", "hi"
    )
    older = tmp_path / "older"
    shutil.copytree(tiny_workdir, older)
    config = json.loads((older / "config.json").read_text())
    del config["model"]["cross_attention"]["num_latents"]  # as before that option existed
    (older / "config.json").write_text(json.dumps(config))
    assert "another version of lisendiff_jax (no --config.model.cross_attention.num_latents)" in (
        _one_line_error(capsys, "--workdir", str(older), "--context", "hi")
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_workdir, corrupt)
    for blob in (corrupt / "0" / "state").rglob("d/*"):
        blob.write_bytes(blob.read_bytes()[:50])
    # Through sample.py itself: a failed restore leaves orbax's threads behind, which must die
    # with the command, not linger in the test process.
    run = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--workdir", str(corrupt), "--context", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert f"{corrupt / '0'}: cannot restore checkpoint" in lines[0]


@pytest.mark.parametrize("module", ["analysis", "evaluation.__main__", "export", "serve"])
def test_module_commands_name_themselves_in_their_usage(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"lisendiff_jax.{module}").main(["--help"])
    command = "python -m lisendiff_jax." + module.removesuffix(".__main__")
    assert capsys.readouterr().out.startswith(f"usage: {command} ")
