"""Restoring a workdir for inference, exporting it, and loading the export back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from lisendiff_jax.export import ExportError, export, load_exported
from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir, restore_workdir
from lisendiff_jax.method.lora import LoRALinear
from lisendiff_jax.method.model import LatentStat

IDS = np.random.RandomState(0).randint(3, 500, (2, 11)).astype(np.int32)
# Shaped like the JSONL test's batch (3 requests, short prompts) and sampled with the same
# options, so that the two share one compiled reply function.
REQUESTS = [
    Request(("My cat is sick.", "I'm sorry.", "She won't eat.")),
    Request(("Is the train late?", "Ten minutes."), style="default"),
    Request(("我今天很难过。",), lang="yue"),
]


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): np.asarray(v) for path, v in leaves}


@pytest.fixture(scope="module")
def exported(tiny_workdir, tmp_path_factory):
    return export(tiny_workdir, tmp_path_factory.mktemp("export") / "out", peft=True)


def test_restore_reads_the_saved_trainable_parameters_and_statistics(tiny_workdir):
    model, config, _ = restore_workdir(tiny_workdir)
    assert model.lisendiff and config.model.backbone == "tiny"
    saved = ocp.PyTreeCheckpointer().restore(tiny_workdir / "0" / "state")  # everything, as is
    _, trainable, stats, _ = nnx.split(model, model.trainable_filter(), LatentStat, ...)
    ours = {"trainable": trainable, "latent_stats": stats}
    for name in ours:
        flat_saved = _flat(saved[name])
        flat_ours = _flat(nnx.to_pure_dict(ours[name]))
        assert flat_ours.keys() == {k[:-1] for k in flat_saved}  # saved Variables end in value
        for key, value in flat_ours.items():
            np.testing.assert_array_equal(value, flat_saved[(*key, "value")], err_msg=str(key))
    # LoRA B has left its zero start, so merging it changes the kernels.
    q_proj = model.backbone.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and np.abs(q_proj.lora_b[...]).max() > 0


def test_transformers_loads_the_export_and_its_logits_match_ours(tiny_workdir, exported):
    model, _, tokenizer = load_workdir(tiny_workdir, dtype="float32")
    ours = np.asarray(model.backbone(IDS))  # latents None: the LisenDiff modules are off
    reference = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    render = lambda t: t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render(AutoTokenizer.from_pretrained(exported)) == render(tokenizer)


def test_peft_adapter_on_the_original_backbone_matches_the_unmerged_model(tiny_workdir, exported):
    from peft import PeftModel

    model, _, _ = restore_workdir(tiny_workdir)
    model.eval()
    ours = np.asarray(model.backbone(IDS))
    config = json.loads((exported / "peft" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, exported / "peft").eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_export_then_load_samples_exactly_like_the_workdir(tiny_workdir, exported):
    options = Options(seed=3, max_tokens=8)
    replies = []
    for model, config, tokenizer in (load_workdir(tiny_workdir), load_exported(exported)):
        replies.append(Listener(model, config, tokenizer).reply(REQUESTS, options))
    for a, b in zip(*replies, strict=True):
        assert a.text == b.text
        np.testing.assert_array_equal(a.latent, b.latent)
    assert replies[0][0].latent.shape == (1, 512)
    assert replies[0][0].latent.tolist() != replies[0][1].latent.tolist()
    assert not any(r.truncated for r in replies[0])


def test_export_errors_are_named(tiny_workdir, exported, tmp_path):
    with pytest.raises(ExportError, match="not an empty folder"):
        export(tiny_workdir, exported)
    with pytest.raises(ExportError, match="not a folder written by lisendiff_jax.export"):
        load_exported(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "lisendiff" / "config.json").read_text())
    config["run_config"]["model"]["denoiser"]["depth"] = 2
    (broken / "lisendiff" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"missing \d+ tensor\(s\), e\.g\. denoisers"):
        load_exported(broken)


def test_a_relative_workdir_restores(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir.parent)
    relative, _, _ = restore_workdir(Path(tiny_workdir.name))
    absolute, _, _ = restore_workdir(tiny_workdir)
    pairs = zip(
        jax.tree.leaves(nnx.state(relative, nnx.Param)),
        jax.tree.leaves(nnx.state(absolute, nnx.Param)),
        strict=True,
    )
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
