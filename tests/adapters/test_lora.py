"""LoRA via PEFT on Llama, Qwen2 and GPT-2: only the adapter trains, and a trained
adapter round-trips through save -> PEFT load, ``LoRA.load`` and ``LoRA.load_weights``."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter, count_parameters
from leantune.config import AdapterConfig

CFG = AdapterConfig(r=4, alpha=8.0, dropout=0.1)


def fresh_base(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch, use_cache=False).logits


def trained_lora(model_dir: str, steps: int = 3):
    torch.manual_seed(0)
    adapter = build_adapter(CFG)
    model = adapter.apply(fresh_base(model_dir))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(model.config.vocab_size)
    model.train()
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return adapter, model


def test_only_lora_parameters_train(tiny_model_dir):
    base = fresh_base(tiny_model_dir)
    _, base_total = count_parameters(base)
    model = build_adapter(CFG).apply(base)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == base_total + trainable
    # all-linear adapts every projection of every layer, never the LM head.
    assert not any("lm_head" in n for n in names)
    # GPT-2: c_attn, c_proj, c_fc, mlp c_proj; Llama/Qwen2: q k v o gate up down.
    per_layer = 4 if model.config.model_type == "gpt2" else 7
    assert len(names) == 2 * model.config.num_hidden_layers * per_layer  # A and B each


def test_fresh_lora_starts_from_the_base_model(tiny_model_dir):
    base = fresh_base(tiny_model_dir)
    batch = inputs(base.config.vocab_size)
    expected = logits(base, batch)
    model = build_adapter(CFG).apply(base)
    torch.testing.assert_close(logits(model, batch), expected, atol=0, rtol=0)


def test_saved_adapter_round_trips(tiny_model_dir, tmp_path):
    adapter, model = trained_lora(tiny_model_dir)
    assert all(p.detach().abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    batch = inputs(model.config.vocab_size)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(fresh_base(tiny_model_dir), batch), atol=1e-4)

    adapter.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    saved_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved_cfg["peft_type"], saved_cfg["r"], saved_cfg["lora_alpha"]) == ("LORA", 4, 8.0)

    # PEFT itself (what vLLM / TGI users would do) reads our directory.
    peft_model = PeftModel.from_pretrained(fresh_base(tiny_model_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(peft_model, batch), trained, atol=1e-5, rtol=0)

    loaded = adapter.load(fresh_base(tiny_model_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), trained, atol=1e-5, rtol=0)
    assert count_parameters(loaded)[0] == 0  # inference by default
    resumable = adapter.load(fresh_base(tiny_model_dir), tmp_path / "adapter", trainable=True)
    assert count_parameters(resumable)[0] == count_parameters(model)[0]

    torch.manual_seed(123)  # a different random A than the trained adapter started from
    fresh = build_adapter(CFG).apply(fresh_base(tiny_model_dir))
    assert not torch.allclose(logits(fresh, batch), trained, atol=1e-4)
    adapter.load_weights(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-5, rtol=0)
    for (name, p), q in zip(fresh.named_parameters(), model.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_load_weights_rejects_an_adapter_of_another_shape(llama_dir, tmp_path):
    adapter, model = trained_lora(llama_dir, steps=1)
    adapter.save(model, tmp_path / "adapter")
    narrow = build_adapter(AdapterConfig(r=4, alpha=8.0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="do not fit this model.*unexpected: .*(k_proj|mlp)"):
        narrow.load_weights(narrow.apply(fresh_base(llama_dir)), tmp_path / "adapter")


def test_load_weights_rejects_an_adapter_covering_fewer_modules(llama_dir, tmp_path):
    """The uncovered modules would silently keep a fresh init (resume with new targets)."""
    narrow = build_adapter(AdapterConfig(r=4, alpha=8.0, target_modules=["q_proj"]))
    narrow.save(narrow.apply(fresh_base(llama_dir)), tmp_path / "narrow")
    adapter = build_adapter(CFG)
    with pytest.raises(ValueError, match="do not fit this model.*missing: .*(k_proj|mlp)"):
        adapter.load_weights(adapter.apply(fresh_base(llama_dir)), tmp_path / "narrow")


def test_lora_dropout_is_fast_and_still_drops(tiny_model_dir, tmp_path):
    from leantune.model.dropout import FastDropout

    adapter, model = trained_lora(tiny_model_dir, steps=1)
    lora = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert lora and all(isinstance(d, FastDropout) and d.p == CFG.dropout for d in lora)
    batch = inputs(model.config.vocab_size)
    model.train()
    with torch.no_grad():  # train mode: two forwards differ (the masks); eval: they agree
        assert not torch.equal(model(**batch).logits, model(**batch).logits)
    # Reloaded for more training, the dropout is the fast one again.
    adapter.save(model, tmp_path / "a")
    again = adapter.load(fresh_base(tiny_model_dir), tmp_path / "a", trainable=True)
    assert any(isinstance(m, FastDropout) for m in again.modules())
