"""train.precision: the start-up measurement, what auto chooses from it, the peak FLOP/s
and its cache, and a bf16-mixed run end to end (fp32 master weights, autocast forwards,
the packing probe judged in bf16, MFU in the summary)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Gemma3nTextConfig, LlamaConfig, PretrainedConfig

import leantune.model.precision as precision
from leantune.config import ConfigError, load_config
from leantune.model.precision import (
    Precision,
    autocast_forward,
    choose,
    compute_dtype,
    linear_ratio,
    master_weights_fp32,
    model_shapes,
)
from leantune.train import loop

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, vocab_size=101)
CPU = torch.device("cpu")


def test_linear_ratio_measures_both_paths():
    ratio = linear_ratio(model_shapes(CONFIG), CPU, reps=1)  # the real one, not conftest's
    assert math.isfinite(ratio) and ratio > 0
    assert model_shapes(CONFIG) == [(32, 64), (64, 32), (32, 32), (32, 101)]


def test_per_layer_and_missing_sizes(monkeypatch, tmp_path, caplog):
    """Gemma-3n gives intermediate_size per layer (a list): auto measures its usual size.
    A config with no hidden or vocabulary size gets fp32 and one line, not a traceback."""
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "linear_ratio", linear_ratio)  # the real one
    gemma3n = Gemma3nTextConfig(hidden_size=32, intermediate_size=[64, 64, 96],
                                num_hidden_layers=3, vocab_size=101)
    assert model_shapes(gemma3n) == [(32, 64), (64, 32), (32, 32), (32, 101)]
    chosen = choose("auto", "auto", gemma3n, CPU)
    assert chosen.ratio > 0 and "linear layers at" in chosen.reason
    chosen = choose("auto", "auto", PretrainedConfig(vocab_size=101), CPU)
    assert chosen.used == "fp32" and chosen.ratio is None
    assert "could not time bf16" in chosen.reason and "names no hidden_size" in chosen.reason
    assert "train.precision=auto: could not time bf16" in caplog.text


@pytest.mark.parametrize("ratio, used", [(3.0, "bf16-mixed"), (1.25, "bf16-mixed"),
                                         (1.2, "fp32"), (0.05, "fp32")])
def test_auto_follows_the_measured_ratio(monkeypatch, tmp_path, ratio, used):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "linear_ratio", lambda shapes, device, reps=3: ratio)
    chosen = choose("auto", "auto", CONFIG, CPU)
    assert chosen.used == used and chosen.ratio == ratio
    assert f"{ratio:.2f}x fp32" in chosen.reason
    assert chosen.peak_flops > 0 and "torch.matmul 2048x2048x2048" in chosen.peak_method
    assert chosen.compute_dtype == (torch.float32 if used == "fp32" else torch.bfloat16)


def test_explicit_choices_and_half_weights_skip_the_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "linear_ratio", lambda *a, **k: pytest.fail("measured"))
    assert choose("bf16-mixed", "auto", CONFIG, CPU).used == "bf16-mixed"
    assert choose("fp32", "auto", CONFIG, CPU).reason == "asked for"
    half = choose("auto", "bfloat16", CONFIG, CPU)
    assert half.used == "bf16" and "model.dtype=bfloat16" in half.reason


def test_measurements_are_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "matmul_peak",
                        lambda dtype, device: calls.append(dtype) or 1e11)
    first = choose("fp32", "auto", CONFIG, CPU)
    again = choose("fp32", "auto", CONFIG, CPU)
    assert calls == [torch.float32] and first.peak_flops == again.peak_flops == 1e11
    store = json.loads((tmp_path / "machine.json").read_text())
    assert any("threads" in k and "matmul peak float32" in k for k in store)


def test_base_weight_dtype_by_precision():
    mixed = Precision("auto", "bf16-mixed", "", 2.0, 1.0, "")
    assert mixed.weight_dtype("auto", trains_base=False, cuda=False) == "float32"
    assert mixed.weight_dtype("auto", trains_base=False, cuda=True) == "bfloat16"
    assert mixed.weight_dtype("auto", trains_base=True, cuda=True) == "float32"
    assert Precision("bf16", "bf16", "", None, 1.0, "").weight_dtype(
        "auto", False, False) == "bfloat16"
    assert mixed.weight_dtype("float16", False, False) == "float16"


def test_autocast_forward_and_master_weights():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).bfloat16()
    model[0].requires_grad_(False)
    assert master_weights_fp32(model) == 2  # the second layer's weight and bias
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    autocast_forward(model, torch.bfloat16, "cpu")
    assert compute_dtype(model) == torch.bfloat16
    out = model(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32


def test_generation_runs_under_the_autocast_too():
    """PEFT's generate reaches the inner model's forward, past the patched one: with an
    untied head held in bf16 it met fp32 hidden states and failed."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    mixed = Precision("bf16-mixed", "bf16-mixed", "test", 2.0, 1e12, "test")
    mixed.prepare(model, "cpu")
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # frozen, untied
    ids = torch.randint(1, 64, (1, 5))
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    model.leantune_autocast = None  # in_fp32's switch reaches generate as well
    with pytest.raises(RuntimeError, match="same dtype"):
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("pair", ["train.precision=fp32 model.dtype=bfloat16",
                                  "train.precision=bf16 model.dtype=float32"])
def test_conflicting_dtype_is_refused(pair):
    with pytest.raises(ConfigError, match=r"train\.precision=.*model\.dtype="):
        load_config(None, pair.split())


def test_a_bf16_mixed_run(llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {' '.join(['x'] * (i % 11 + 1))}",
                                        "completion": f" {i}"}) + "\n" for i in range(40)))
    losses = {}
    for mode in ("fp32", "bf16-mixed"):
        cfg = load_config(None, [f"model.name_or_path={llama_dir}", f"data.path={data}",
                                 f"train.output_dir={tmp_path / mode}", "train.max_steps=4",
                                 "train.progress=false", "data.max_length=64", "eval.generate=0",
                                 f"train.precision={mode}", "optim.lr=1e-3"])
        summary = loop.train(cfg)
        losses[mode] = summary["eval_loss"]["after"]
        assert summary["precision"]["used"] == mode
        assert summary["chunked_loss"]["used"]
        mfu = summary["mfu"]
        assert 0 < mfu["fraction"] == pytest.approx(
            mfu["achieved_flops_per_second"] / mfu["peak_flops_per_second"])
        probe = summary["packing"]["probe"]  # judged in fp32 whatever the run's precision
        assert probe["dtype"] == "float32" and probe["judged"] == "float32"
        assert probe["run_dtype"] == ("float32" if mode == "fp32" else "bfloat16")
        assert (probe["run_errors"] is None) == (mode == "fp32")
        assert summary["packing"]["used"] == "online"
    # The saved adapter is fp32 (master weights), and the two runs end close.
    assert abs(losses["bf16-mixed"] - losses["fp32"]) < 0.05 * losses["fp32"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bf16-mixed" / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_accelerate_launch_mixed_precision_is_honoured(monkeypatch, tmp_path, llama_dir):
    """An accelerate config's mixed_precision: bf16 means bf16-mixed (Accelerate's own
    autocast wraps the forward); asking for fp32 beside it is refused."""
    from accelerate import Accelerator

    from leantune.train.build import choose_precision

    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(type(acc), "mixed_precision", property(lambda self: "bf16"))
    cfg = load_config(None, [f"model.name_or_path={llama_dir}"])
    chosen = choose_precision(cfg, llama_dir, acc)
    assert chosen.used == "bf16-mixed" and "mixed_precision=bf16" in chosen.reason
    cfg = load_config(None, [f"model.name_or_path={llama_dir}", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="train.precision=fp32 but accelerate launch set"):
        choose_precision(cfg, llama_dir, acc)


def test_measuring_leaves_the_global_rng_alone(monkeypatch, tmp_path):
    """A cold cache measures inside the run, after its seed is set: a run must train the
    same whether the machine's figures were cached or not."""
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    linear_ratio(model_shapes(CONFIG), CPU, reps=1)
    choose("fp32", "auto", CONFIG, CPU)  # cold cache: measures the peak
    assert torch.equal(torch.rand(3), expected)


def test_frozen_linears_in_bf16_compute_what_per_use_casts_did(llama_dir):
    """bf16-mixed holds the frozen base linears in bf16: autocast would have cast them to
    bf16 for every matmul, so the forward and the adapter's gradients are bit-identical to
    the fp32-held base; a head tied to the embeddings and the norms stay fp32."""
    from transformers import AutoModelForCausalLM

    from leantune.adapters import build_adapter
    from leantune.config import AdapterConfig

    def model(frozen_half):
        base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        base.config.tie_word_embeddings = True
        base.tie_weights()
        torch.manual_seed(0)
        m = build_adapter(AdapterConfig(r=4, alpha=8.0, dropout=0.0)).apply(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
        Precision("bf16-mixed", "bf16-mixed", "", 2.0, 1.0, "").prepare(m, "cpu", frozen_half)
        return m

    held, cast = model(True), model(False)
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer.weight" in n)
    assert all(d == torch.float32 for n, d in dtypes.items()
               if "lora_" in n or "norm" in n or "embed" in n)
    assert held.get_output_embeddings().weight.dtype == torch.float32  # tied: shared
    assert all(p.dtype == torch.float32 for p in cast.parameters())
    ids = torch.randint(0, held.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (held, cast):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert torch.equal(held(input_ids=ids).logits, cast(input_ids=ids).logits)
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_chunked_head_runs_in_the_models_compute_dtype(llama_dir, monkeypatch):
    """The loss is computed after the autocast forward returns: the chunked head must
    still take bf16 matmuls under bf16-mixed (it ran in fp32 before)."""
    from transformers import AutoModelForCausalLM

    import leantune.model.chunked_loss as chunked
    from leantune.model.logprobs import target_logprobs

    seen = []
    real = chunked._LinearLogProbs.apply
    monkeypatch.setattr(chunked._LinearLogProbs, "apply",
                        lambda *a: seen.append(a[4]) or real(*a))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    fp32 = target_logprobs(model, batch, chunked=True)
    autocast_forward(model, torch.bfloat16, "cpu")
    mixed = target_logprobs(model, batch, chunked=True)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(mixed, fp32, atol=0.1, rtol=0.05)  # bf16 rounding, no more
