"""GGUF out (WIP, issue 20): a trained run exported to GGUF and read back by transformers'
own GGUF loader gives the merged model's logits (f32 exactly; f16 and q8_0 within a
bound), the same token ids and the same chat prompt, for a tiny Llama and a tiny Qwen2."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import leantune.train.loop as loop
from conftest import save_tiny_model
from leantune.cli import main
from leantune.config import load_config
from leantune.export import export_run
from leantune.gguf_out import GGUFExportError, write_gguf

BOUNDS = {"f32": 0.0, "f16": 5e-3, "q8_0": 1e-1}  # ||Δ logits|| / ||logits||


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    base = save_tiny_model(tmp / "base", request.param)
    data = tmp / "add.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 9} {i % 4}"},
        {"role": "assistant", "content": f"The answer is {i % 9 + i % 4}."}]}) + "\n"
        for i in range(24)))
    run_dir = tmp / "run"
    loop.train(load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"train.output_dir={run_dir}",
        "train.max_steps=3", "train.batch_size=4", "optim.lr=5e-2", "train.progress=false",
        "eval.before=false", "eval.generate=0"]))
    merged = tmp / "merged"
    export_run(run_dir, merged)
    return run_dir, merged


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_transformers_reads_back_the_merged_model(trained, tmp_path, quant):
    run_dir, merged = trained
    assert main(["export", str(run_dir), "--format", "gguf", "--quant", quant,
                 "--out", str(tmp_path)]) == 0
    path = tmp_path / f"model-{quant}.gguf"
    assert path.is_file() and not list(tmp_path.glob(".*"))  # nothing half-written left
    modelfile = (tmp_path / f"model-{quant}.Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}<|im_end|>" in modelfile
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32)
    ids = torch.randint(5, ref.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, got(input_ids=ids).logits
    error = float((a - b).norm() / a.norm())
    print(f"{quant}: relative error {error:.2e}")
    assert error <= BOUNDS[quant]
    assert bool((a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9)
    ref_tok = AutoTokenizer.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "add 3 4 <|im_end|> The answer is 7."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    chat = [{"role": "user", "content": "add 2 2"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_unsupported_architectures_are_named(tmp_path):
    base = save_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel cannot be exported.*supported: "
                                              "LlamaForCausalLM"):
        write_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
