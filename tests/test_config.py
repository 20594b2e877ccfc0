"""The experiment schema: paper defaults, and errors that name the option."""

from __future__ import annotations

import re

import pytest

from lisendiff_jax.config import (
    ConfigError,
    add_source,
    base_config,
    check_data_paths,
    check_value,
    paper_config,
    validate,
)


def test_paper_config_has_appendix_b_values():
    c = paper_config("meta-llama/Llama-3.1-8B-Instruct", "ja")
    validate(c)
    assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout) == (16, 32.0, 0.1)
    assert tuple(c.model.lora.targets) == ("q_proj", "v_proj")
    assert c.model.train_lm_head and c.model.cross_attention.last_n_layers == 12
    assert (c.batch_size, c.learning_rate, c.num_steps) == (1, 1e-4, 0)
    d = c.model.diffusion
    assert (d.num_steps, d.beta_start, d.beta_end, d.schedule) == (50, 0.001, 0.02, "linear")
    fractions = {k: v.fraction for k, v in c.data.sources.items()}
    assert fractions == {"j_daily_dialog": 0.10, "j_empathetic_dialogues": 0.20}
    en = paper_config("Qwen/Qwen2-7B", "en", lisendiff=False)
    assert {k: v.fraction for k, v in en.data.sources.items()} == {
        "daily_dialog": 0.03,
        "esconv": 0.10,
    }
    assert en.name == "qwen2-7b_en_lora_only" and not en.model.lisendiff


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr_schedule", "exp", r"--config\.lr_schedule: 'exp' is not one of"),
        ("model.remat", "some", r"--config\.model\.remat"),
        ("model.attention", "flash", r"--config\.model\.attention: 'flash' is not one of auto"),
        ("model.low_precision_update", "fp32", r"--config\.model\.low_precision_update: 'fp32'"),
        ("model.lora.targets", ("q_proj", "qq"), r"--config\.model\.lora\.targets: 'qq'"),
        ("model.diffusion.beta_end", 0.0001, r"--config\.model\.diffusion\.beta_start"),
        ("data.sources.esconv.fraction", 0.0, r"--config\.data\.sources\.esconv\.fraction"),
        ("data.sources.esconv.format", "csv", r"--config\.data\.sources\.esconv\.format"),
        ("batch_size", 0, r"--config\.batch_size: must be > 0"),
        ("model.cross_attention.num_latents", 0, r"--config\.model\.cross_attention\.num_latents"),
        (
            "data.train_prompt",
            "english",
            r"--config\.data\.train_prompt: 'english' is not one of example, target, none",
        ),
    ],
)
def test_bad_values_name_the_option(option, value, message):
    c = paper_config("x", "en")
    *parents, leaf = option.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_cudnn_attention_needs_half_precision():
    c = paper_config("x", "en")
    c.model.attention, c.model.compute_dtype = "cudnn", "float32"
    with pytest.raises(ConfigError, match=r"--config\.model\.attention: 'cudnn' needs"):
        validate(c)


def test_cudnn_attention_needs_an_even_max_length():
    c = paper_config("x", "en")
    c.model.attention, c.data.max_length = "cudnn", 511
    with pytest.raises(ConfigError, match=r"--config\.data\.max_length: 511 is odd"):
        validate(c)
    c.data.max_length = 512
    validate(c)
    c.model.attention, c.data.max_length = "auto", 511
    validate(c)


def test_no_sources_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.sources: name at least one corpus"):
        validate(base_config())


@pytest.mark.parametrize(
    "option, text, message",
    [
        ("num_steps", "abc", "--config.num_steps: 'abc' is not an int"),
        ("num_steps", "1.5", "--config.num_steps: '1.5' is not an int"),
        ("learning_rate", "fast", "--config.learning_rate: 'fast' is not a float"),
        ("model.lisendiff", "yes", "--config.model.lisendiff: 'yes' is not a bool (true or false)"),
        ("model.lora.targets", "q_proj v_proj", "--config.model.lora.targets: 'q_proj v_proj' is"),
        ("data.sources.esconv.frachion", "1", "--config.data.sources.esconv.frachion: no such"),
    ],
)
def test_command_line_values_are_parsed_by_the_options_type(option, text, message):
    c = paper_config("x", "en")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_value(c, option, text)


@pytest.mark.parametrize(
    "option, text",
    [
        ("num_steps", "12"),
        ("learning_rate", "3e-4"),
        ("learning_rate", "1"),  # an int is a float too
        ("model.lisendiff", "false"),
        ("model.lora.targets", "q_proj"),  # one element, as a repeated flag gives it
        ("model.lora.targets", "('q_proj', 'k_proj')"),
        ("data.target_lang", "anything"),  # any text is a str; validate judges it
    ],
)
def test_values_absl_accepts_pass(option, text):
    check_value(paper_config("x", "en"), option, text)


def test_add_source_makes_an_entry_options_can_then_change(tmp_path):
    c = paper_config("x", "en")
    assert add_source(c, f"mine=jsonl:{tmp_path}:0.5") == "mine"
    assert add_source(c, "hub=esconv:thu-coai/esconv") == "hub"  # fraction 1 by default
    assert add_source(c, "colon=jsonl:/data/a:b.jsonl") == "colon"  # not a fraction: the path
    assert c.data.sources.mine.to_dict() == dict(
        format="jsonl", path=str(tmp_path), fraction=0.5, split=""
    )
    assert (c.data.sources.hub.path, c.data.sources.hub.fraction) == ("thu-coai/esconv", 1.0)
    assert c.data.sources.colon.path == "/data/a:b.jsonl"
    validate(c)
    c.lock()
    add_source(c, "locked=jsonl:/x")  # a locked config (as absl holds it) still takes one
    assert "locked" in c.data.sources


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mine=jsonl", "--source mine=jsonl: expected NAME=FORMAT:PATH[:FRACTION], e.g."),
        ("jsonl:/data/x", "--source jsonl:/data/x: expected NAME=FORMAT:PATH[:FRACTION]"),
        ("my.data=jsonl:/x", "--source my.data=jsonl:/x: NAME 'my.data' must be letters"),
        ("esconv=jsonl:/x", "the config already has a source 'esconv'; change it with "),
        ("mine=csv:/x", "--source mine=csv:/x: FORMAT 'csv' is not one of empathetic_"),
        ("mine=jsonl:/x:1.5", "--source mine=jsonl:/x:1.5: FRACTION '1.5' is not in (0, 1]"),
        ("mine=jsonl:/x:0", "--source mine=jsonl:/x:0: FRACTION '0' is not in (0, 1]"),
    ],
)
def test_bad_source_is_one_line_naming_it(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        add_source(paper_config("x", "en"), spec)
    assert "\n" not in str(error.value)


def test_missing_data_path_names_the_option_and_the_path(tmp_path):
    c = paper_config("x", "en")
    c.data.sources.daily_dialog.path = str(tmp_path)
    missing = tmp_path / "nowhere"
    c.data.sources.esconv.path = str(missing)
    with pytest.raises(ConfigError) as error:
        check_data_paths(c)
    assert str(error.value) == (
        f"--config.data.sources.esconv.path: {missing}: no such file or directory (format 'esconv')"
    )
    c.data.sources.esconv.path = str(tmp_path)
    check_data_paths(c)
