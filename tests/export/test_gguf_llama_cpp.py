"""GGUF out, run by llama.cpp itself (opt-in: needs ``llama-cpp-python``, which PyPI ships
only as a source package that builds llama.cpp, ~5-10 min on 2 cores; CI skips this).

    pip install llama-cpp-python && python -m pytest tests/export/test_gguf_llama_cpp.py

For a trained tiny Llama, Mistral, Qwen2, Qwen3, and a Llama with a SentencePiece-style
tokenizer, exported in f32, llama.cpp must split
held-out text into the HF tokenizer's ids (its own pre-tokenizer, chosen by the name we
wrote, and BOS as we said), give the merged HF model's logits at every position, and
reply greedily with the same tokens as ``transformers`` ``generate``. The LoRA adapter
alone (``--format gguf-lora``), applied by llama.cpp over the base's GGUF, must give the
merged model's logits too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.cli import main
from leantune.export.gguf.writer import write_gguf

from conftest import train_tiny_run

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = ["Paris has 2,148,271 people (2020)!\n\tIt's  the capital — of France.",
         "<|im_start|>user\nadd 3 4<|im_end|>\n<|im_start|>assistant\nThe answer is 7.",
         "def add(a, b):\n    return a + b  # 0 1 2 3 can't WON'T  ünïcödé"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "llama-spm"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"llama-cpp-{request.param}")
    run_dir, merged = train_tiny_run(tmp, request.param)
    assert main(["export", str(run_dir), "--format", "gguf", "--quant", "f32",
                 "--out", str(tmp / "m.gguf")]) == 0
    # An f32 KV cache (llama.cpp's default is f16), so the comparison is of f32 with f32.
    model = llama_cpp.Llama(str(tmp / "m.gguf"), n_ctx=256, logits_all=True, n_threads=1,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                            verbose=False)
    return merged, model, tmp, run_dir


def cpp_logits(model, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), V]`` at every position, from a fresh context."""
    model.reset()
    model.eval(ids)
    return np.asarray(model.scores[:len(ids)])


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(exported):
    merged, model, _, _ = exported
    tok = AutoTokenizer.from_pretrained(merged)
    for text in TEXTS:
        assert model.tokenize(text.encode(), add_bos=True, special=True) == \
            tok(text)["input_ids"], text


def test_llama_cpp_gives_the_merged_models_logits(exported):
    merged, model, _, _ = exported
    tok = AutoTokenizer.from_pretrained(merged)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        got = cpp_logits(model, ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - ref).max() <= 1e-4, text


def test_llama_cpp_replies_greedily_as_transformers_does(exported):
    merged, model, _, _ = exported
    tok = AutoTokenizer.from_pretrained(merged)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "add 2 5"}], tokenize=True,
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    model.reset()
    got = []
    for token in model.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(ref) or token == tok.eos_token_id:
            break
    assert got == ref


def test_llama_cpp_applies_the_lora_gguf_over_the_base_gguf(exported):
    merged, _, tmp, run_dir = exported
    assert main(["export", str(run_dir), "--format", "gguf-lora", "--out",
                 str(tmp / "lora.gguf")]) == 0
    write_gguf(tmp / "base", tmp / "base.gguf", "f32")
    adapted = llama_cpp.Llama(str(tmp / "base.gguf"), lora_path=str(tmp / "lora.gguf"),
                              n_ctx=256, logits_all=True, n_threads=1, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    tok = AutoTokenizer.from_pretrained(merged)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        got = cpp_logits(adapted, ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
            plain = base(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - ref).max() <= 1e-4, text
        assert np.abs(plain - ref).max() > 1e-2  # the adapter changed something


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0}])
def test_llama_cpp_reads_the_rope_scaling(tmp_path, rope):
    """Llama 3's scaling goes out as ``rope_freqs``, linear as a scaling type; llama.cpp's
    logits over 120 positions (past the original 16) must be the HF model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=256, rope_scaling=rope, rope_theta=1e4,
                         bos_token_id=1, eos_token_id=4, pad_token_id=0)
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    model = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True,
                            n_threads=1, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                            type_v=llama_cpp.GGML_TYPE_F32)
    ids = torch.randint(5, len(tok), (120,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(cpp_logits(model, ids) - ref).max() <= 1e-4
