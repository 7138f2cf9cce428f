"""Every adapter method on every architecture family, on tiny random models: only the
method's parameters train and the loss falls; the saved adapter reloads (ours and
PEFT's / transformers' own loader) to the same logits; merged equals unmerged where
merging exists (QLoRA: against the trained 4-bit model); generation uses the adapter
(its first-token scores are the adapted model's, not the base's)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from leantune.adapters import NotMergeable, build_adapter, count_parameters, load_base
from leantune.config import AdapterConfig, ModelConfig

from conftest import save_tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "phi", "gemma"]
METHODS = ["lora", "dora", "qlora", "ia3", "prompt_tuning", "full"]
LR = {"lora": 2e-2, "dora": 2e-2, "qlora": 2e-2, "ia3": 3e-1, "prompt_tuning": 1e-1,
      "full": 3e-3}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def adapter_config(method: str) -> AdapterConfig:
    if method == "dora":
        return AdapterConfig(method="lora", use_dora=True, r=4, alpha=8.0, dropout=0.0)
    return AdapterConfig(method=method, r=4, alpha=8.0, dropout=0.0, num_virtual_tokens=4)


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {a: save_tiny_model(tmp_path_factory.mktemp(a), a) for a in ARCHS}


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model, b) -> torch.Tensor:
    """Logits aligned with the tokens (a prompt-tuned model's virtual positions dropped)."""
    model.eval()
    return model(**b, use_cache=False).logits[:, -b["input_ids"].shape[1]:]


def train(model, b, lr: float, steps: int = 6) -> list[float]:
    """Steps of AdamW on next-token loss over ``b``; the loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**b, labels=b["input_ids"], use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    return losses


def base_of(model_dir: str, adapter):
    return load_base(ModelConfig(name_or_path=model_dir, dtype="float32"), adapter)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_round_trips_merges_and_generates(method, arch, arch_dirs, tmp_path):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'leantune[qlora]')")
    model_dir = arch_dirs[arch]
    adapter = build_adapter(adapter_config(method))
    torch.manual_seed(0)
    base = base_of(model_dir, adapter)
    _, base_total = count_parameters(base)
    b = batch(base.config.vocab_size)
    before = logits(base, b)
    model = adapter.apply(adapter.prepare_base(base))

    # Only the method's parameters train.
    trainable, total = count_parameters(model)
    if method == "full":
        assert trainable == total == base_total
    else:
        assert 0 < trainable < total and total == base_total + trainable
        assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    losses = train(model, b, LR[method])
    assert losses[-1] < losses[0] - 0.01, losses  # float noise is ~1e-6
    trained = logits(model, b)
    assert not torch.allclose(trained, before, atol=1e-3)

    # Saved vs loaded: our loader, and PEFT's / transformers' own.
    out = tmp_path / adapter.output_name
    adapter.save(model, out)
    reloaded = adapter.load(base_of(model_dir, adapter), out)
    torch.testing.assert_close(logits(reloaded, b), trained, atol=1e-5, rtol=1e-5)
    if method == "full":
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        plain = PeftModel.from_pretrained(base_of(model_dir, adapter), out)
    torch.testing.assert_close(logits(plain, b), trained, atol=1e-5, rtol=1e-5)

    # Merged vs unmerged.
    if method == "prompt_tuning":
        with pytest.raises(NotMergeable, match="cannot be merged"):
            adapter.merge(reloaded)
    else:
        merged = adapter.merge(adapter.load(adapter.merge_base(base_of(model_dir, adapter)), out))
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, b), trained, atol=2e-5, rtol=2e-5)

    # Generation goes through the adapter (prompt tuning: virtual tokens included).
    reloaded.eval()
    with torch.no_grad():
        gen = reloaded.generate(**b, max_new_tokens=2, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=0)
    assert gen.sequences.shape == (3, 12)
    torch.testing.assert_close(gen.scores[0], trained[:, -1], atol=1e-4, rtol=1e-4)


def test_qlora_stores_the_base_in_4_bits(arch_dirs):
    if not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'leantune[qlora]')")
    from leantune.adapters import memory_footprint

    adapter = build_adapter(adapter_config("qlora"))
    base = base_of(arch_dirs["llama"], adapter)
    linear4 = [m for m in base.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4) == 2 * 7  # every projection of both layers; not the head
    q = linear4[0].weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # double quantization
    fp = AutoModelForCausalLM.from_pretrained(arch_dirs["llama"], dtype=torch.float32)
    assert count_parameters(base)[1] == count_parameters(fp)[1]
    footprint = memory_footprint(base, torch.float32)
    assert footprint["full_precision"] == memory_footprint(fp, torch.float32)["loaded"]
    # Projections go from 32 to ~4.1 bits; embeddings and norms stay fp32.
    projections = sum(m.weight.quant_state.shape.numel() for m in linear4)
    saved = projections * 4 - projections / 2
    assert footprint["loaded"] == pytest.approx(footprint["full_precision"] - saved, rel=0.02)


@pytest.mark.parametrize("arch, preset, expected", [
    ("llama", "attention", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj"}),
    ("llama", "mlp", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    ("gpt2", "attention", {"attn.c_attn", "attn.c_proj"}),
    ("gpt2", "mlp", {"mlp.c_fc", "mlp.c_proj"}),
    ("phi", "attention", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.dense"}),
    ("phi", "mlp", {"mlp.fc1", "mlp.fc2"}),
    ("gemma", "attention", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj"}),
])
def test_target_presets_adapt_exactly_the_named_blocks(arch, preset, expected, arch_dirs):
    adapter = build_adapter(AdapterConfig(r=2, target_modules=preset))
    model = adapter.apply(base_of(arch_dirs[arch], adapter))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    layers = model.config.num_hidden_layers
    assert len(adapted) == layers * len(expected)
    assert {".".join(n.split(".")[-2:]) for n in adapted} == expected


@pytest.mark.parametrize("arch, scaled_input", [("llama", "mlp.down_proj"),
                                                 ("gpt2", "mlp.c_proj"), ("phi", "mlp.fc2")])
def test_ia3_scales_the_mlp_down_projection_input(arch, scaled_input, arch_dirs):
    """auto (PEFT's table) and the all-linear preset (our fan-in rule) agree on which
    layer is feed-forward: the one whose input is the MLP's hidden activation."""
    for spec in ("auto", "all-linear"):
        adapter = build_adapter(AdapterConfig(method="ia3", target_modules=spec))
        model = adapter.apply(base_of(arch_dirs[arch], adapter))
        scaled = {".".join(n.split(".")[-2:]) for n, m in model.named_modules()
                  if getattr(m, "is_feedforward", False)}
        assert scaled == {scaled_input}, spec


def test_a_preset_that_matches_nothing_names_the_layers_it_saw():
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="attention.*linear layers are: encoder"):
        build_adapter(AdapterConfig(r=2, target_modules="attention")).peft_config(model)
