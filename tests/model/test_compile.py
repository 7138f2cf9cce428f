"""train.compile: the decoder layers compiled give the eager loss and gradients (padded
and packed rows), run compiled only inside ``active()``, and a compile that fails leaves
a run that trains exactly as an eager one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leantune.train.build as build
from leantune.config import load_config
from leantune.model.compile import CompiledBlocks, repeated_blocks
from leantune.packing.collate import collate_packed, collate_padded
from leantune.train import loop
from packing.test_packing_parity import BINS, lora, make_examples

from conftest import loss_sum


def test_repeated_blocks_are_the_decoder_layers(llama_dir):
    model = lora(llama_dir, "sdpa")
    blocks = repeated_blocks(model)
    assert blocks and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    assert blocks == list(model.get_base_model().model.layers)
    assert repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []
    with pytest.raises(ValueError, match="no repeated blocks"):
        CompiledBlocks(nn.Sequential(nn.Linear(2, 2)))


def test_compiled_loss_and_gradients_equal_eager(llama_dir):
    model = lora(llama_dir, "sdpa")
    compiled = CompiledBlocks(model)
    examples = make_examples(model.config.vocab_size)

    def loss_and_grads(batch):
        model.zero_grad()
        loss, _ = loss_sum(model, batch)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                               if p.requires_grad}

    for batch in (collate_padded(examples, pad_id=0), collate_packed(examples, BINS, pad_id=0)):
        eager_loss, eager_grads = loss_and_grads(batch)
        with compiled.active():
            assert all(b._compiled_call_impl is not None for b in compiled.blocks)
            loss, grads = loss_and_grads(batch)
        assert all(b._compiled_call_impl is None for b in compiled.blocks)  # eager again
        torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
        for name, g in eager_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)


def test_a_failing_compile_falls_back_to_the_eager_run(llama_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} {i % 3}", "completion": f" {i}"})
                            + "\n" for i in range(24)))

    def run(name, *over):
        cfg = load_config(None, [f"model.name_or_path={llama_dir}", f"data.path={data}",
                                 f"train.output_dir={tmp_path / name}", "train.max_steps=3",
                                 "train.batch_size=4", "train.progress=false",
                                 "eval.generate=0", "optim.lr=1e-2", *over])
        return loop.train(cfg)

    def boom(gm, inputs):
        raise RuntimeError("no C++ compiler here")

    real = build.CompiledBlocks
    monkeypatch.setattr(build, "CompiledBlocks", lambda model: real(model, backend=boom))
    fell_back = run("compiled", "train.compile=true")
    eager = run("eager")
    assert fell_back["compile"]["requested"] and not fell_back["compile"]["used"]
    assert "no C++ compiler here" in fell_back["compile"]["reason"]
    assert eager["compile"] == {"requested": False, "used": False}
    assert fell_back["eval_loss"]["after"] == eager["eval_loss"]["after"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "eager" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
