"""The experiment schema: paper defaults, and errors that name the option."""

from __future__ import annotations

import pytest

from lisendiff_jax.config import ConfigError, base_config, paper_config, validate


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
        ("model.lora.targets", ("q_proj", "qq"), r"--config\.model\.lora\.targets: 'qq'"),
        ("model.diffusion.beta_end", 0.0001, r"--config\.model\.diffusion\.beta_start"),
        ("data.sources.esconv.fraction", 0.0, r"--config\.data\.sources\.esconv\.fraction"),
        ("data.sources.esconv.format", "csv", r"--config\.data\.sources\.esconv\.format"),
        ("batch_size", 0, r"--config\.batch_size: must be > 0"),
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


def test_no_sources_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.sources: name at least one corpus"):
        validate(base_config())
