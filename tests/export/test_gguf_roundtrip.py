"""GGUF out, read back by a reader we did not write: transformers' own GGUF loader.

A trained tiny Llama, Mistral, Qwen2, Qwen3 and Llama with a SentencePiece-style
tokenizer run is exported in every quantization and
reloaded with ``from_pretrained(dir, gguf_file=...)`` from a directory that holds nothing
else. Its logits equal, to 1e-5, those of the merged HF model whose 2-D weights went
through gguf-py's quantizer and back (transformers dequantizes with its own kernels): the
names, the RoPE row order and the packing are right for every type. Against the merged
model itself, f32 is exact and the others stay within a bound. The rebuilt tokenizer
gives the same ids and renders the same chat prompt."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.cli import main

from conftest import train_tiny_run

# ||Δ logits|| / ||logits|| against the unquantized merged model, and the least top-1
# agreement, on random ids. Tiny random models (hidden 32) magnify quantization error; the
# quickstart's own figures are in the README.
BOUNDS = {"f32": (1e-6, 1.0), "f16": (5e-3, 0.95), "bf16": (3e-2, 0.9), "q8_0": (8e-2, 0.9),
          "q5_0": (3e-1, 0.7), "q4_1": (4e-1, 0.6), "q4_0": (6e-1, 0.5)}
HELD_OUT = ("Paris has 2,148,271 people (2020)!\n\tIt's  the capital — of France. "
            "<|im_start|>user\nhi<|im_end|> 3.14159 can't WON'T")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "llama-spm"])
def trained(request, tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp(f"gguf-{request.param}"), request.param)


def logits(model) -> torch.Tensor:
    ids = torch.randint(5, model.config.vocab_size, (2, 19),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def through_quantizer(merged, quant: str):
    """The merged model with every 2-D weight quantized by gguf-py and dequantized back;
    in the 4- and 5-bit types the output head (the embedding when tied) at q8_0. (Blocks
    run along rows, so the RoPE row permutation does not change the result.)"""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    for name, p in model.named_parameters():
        kind = gguf.GGMLQuantizationType[quant.upper()]
        if quant in ("q5_0", "q4_1", "q4_0") and name == head:
            kind = gguf.GGMLQuantizationType.Q8_0
        if p.ndim == 2 and quant != "f32":
            packed = gguf.quants.quantize(p.detach().numpy(), kind)
            p.data = torch.from_numpy(gguf.quants.dequantize(packed, kind).copy()).float()
    return model


def tokenizer_kind(merged) -> str:
    spec = json.loads((merged / "tokenizer.json").read_text())
    return "spm" if spec["model"].get("byte_fallback") else "byte-level"


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_transformers_reads_back_the_merged_model(trained, tmp_path, quant, capsys):
    run_dir, merged = trained
    assert main(["export", str(run_dir), "--format", "gguf", "--quant", quant,
                 "--out", str(tmp_path)]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    path = tmp_path / f"model-{quant}.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-{quant}.Modelfile", path.name]
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                      dtype=torch.float32))
    assert (got - logits(through_quantizer(merged, quant))).abs().max() <= 1e-5
    ref = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    error = float((got - ref).norm() / ref.norm())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{quant}: relative error {error:.2e}, top-1 {top1:.3f}")
    bound, least_top1 = BOUNDS[quant]
    assert error <= bound and top1 >= least_top1


def test_the_rebuilt_tokenizer_gives_the_same_ids_and_chat_prompt(trained, tmp_path):
    run_dir, merged = trained
    out = tmp_path / "m.gguf"
    main(["export", str(run_dir), "--format", "gguf", "--quant", "q8_0", "--out", str(out)])
    ref, tok = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(
        tmp_path, gguf_file=out.name)
    text = HELD_OUT
    if tokenizer_kind(merged) == "spm":
        # A legacy SentencePiece tokenizer (Llama 2's kind) puts "▁" before the text after
        # each special token too; transformers rebuilds it non-legacy (Metaspace "first"),
        # so the two part there. llama.cpp agrees with the original (test_gguf_llama_cpp).
        text = text.split("<|im_start|>")[0]
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 2"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    modelfile = out.with_name("m.Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}<|im_end|>" in modelfile


@pytest.mark.parametrize("overrides", [
    ["adapter.use_dora=true"], ["adapter.method=ia3"], ["adapter.method=qlora"],
    ["adapter.method=full", "optim.lr=1e-3"]], ids=["dora", "ia3", "qlora", "full"])
def test_every_mergeable_method_exports(tmp_path, overrides):
    """DoRA, IA3, QLoRA (dequantized, then merged) and full fine-tuning reach the GGUF as
    the merged model they export to: transformers reads back its f32 logits exactly."""
    if overrides == ["adapter.method=qlora"]:
        pytest.importorskip("bitsandbytes")
    run_dir, merged = train_tiny_run(tmp_path, "llama", overrides)
    assert main(["export", str(run_dir), "--format", "gguf", "--quant", "f32",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                      dtype=torch.float32))
    ref = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert (got - ref).abs().max() <= 1e-5
