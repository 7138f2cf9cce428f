"""The start-up checks: the loss's shortcuts stay on where they equal the model's own
full-logits loss; the chunked loss goes off after Gemma-2's soft-capping; the head at
target positions goes off for a model whose code after the head needs every position,
and the run then trains on the full head. A model that fails under bf16 autocast trains
in fp32 when auto chose bf16, and is refused in one line when bf16 was asked for; one
that cannot train at all is one line too - never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, LlamaForCausalLM

from leantune.config import ConfigError, load_config
from leantune.data.encode import IGNORE, Encoded
from leantune.model.chunked_loss import chunked_head
from leantune.model.head import head_at
from leantune.model.load import ModelError
from leantune.model.logprobs import full_nll, model_inputs, target_logprobs
from leantune.model.precision import Precision, autocast_forward, compute_dtype
from leantune.train import loop
from leantune.train.loss_paths import CHECK_TOKENS, check_batch, check_loss_paths, check_trains

from conftest import loss_sum
from helpers import build, packed_batch


def test_both_stay_on_where_exact(arch_dirs):
    model, adapter = build(arch_dirs["llama"], "lora")
    batch = packed_batch(model.config.vocab_size)
    verdict = check_loss_paths(model.eval(), batch, torch.float32)
    assert verdict["head_at_targets"]["used"] and verdict["head_at_targets"]["difference"] < 1e-6
    assert verdict["chunked_loss"]["used"] and verdict["chunked_loss"]["difference"] < 1e-5
    assert chunked_head(model) is not None


def test_chunked_goes_off_after_soft_capping():
    """Gemma-2 soft-caps its logits after the head: the chunked loss would skip that."""
    config = Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, final_logit_softcapping=0.05)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 101, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert chunked_head(model) is not None
    verdict = check_loss_paths(model, batch, torch.float32)
    chunked = verdict["chunked_loss"]
    assert verdict["head_at_targets"]["used"]  # soft-capping is per position: fine there
    assert not chunked["used"] and chunked["difference"] > 1e-3
    assert "after the head" in chunked["reason"]
    assert chunked_head(model) is None  # from now on the model's own head and loss
    with torch.no_grad():
        torch.testing.assert_close(loss_sum(model, batch)[0], -target_logprobs(model, batch).sum())


class NeedsEveryPosition(LlamaForCausalLM):
    """A model whose code after the head reads the logits as ``[B, T, V]`` (as some
    remote-code and multi-head models do): the head at N targets breaks it."""

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        b, t = input_ids.shape
        out.logits = out.logits.reshape(b, t, -1)[..., :self.config.vocab_size]
        return out


def tiny_needy() -> NeedsEveryPosition:
    torch.manual_seed(0)
    return NeedsEveryPosition(LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False)).eval()


def test_head_at_targets_goes_off_where_the_model_needs_every_position(caplog):
    model = tiny_needy()
    ids = torch.randint(1, 101, (2, 9))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    verdict = check_loss_paths(model, batch, torch.float32)
    head, chunked = verdict["head_at_targets"], verdict["chunked_loss"]
    assert not head["used"] and "fails on this model (RuntimeError" in head["reason"]
    assert not chunked["used"] and "cannot run at target positions" in chunked["reason"]
    assert "the LM head at target positions only: off" in caplog.text
    with torch.no_grad():  # every path now runs the full head: the model's own loss
        with head_at(model, batch["labels"] != -100):
            logits = model(**model_inputs(batch, model)).logits
        loss = -target_logprobs(model, batch).sum()
        _, full = full_nll(model, batch)
    assert logits.dim() == 3 and torch.equal(loss, full)


def train_as(tmp_path, tokenizer, monkeypatch, convert, *overrides) -> dict:
    """A two-step run of a tiny Llama turned, as it loads, into ``convert(loaded)`` (a
    model class or hooks transformers cannot save)."""
    import leantune.model.load as model_module

    directory = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
                     ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q {i} " * (i % 4 + 1),
                                        "completion": f" a{i}"}) + "\n" for i in range(16)))
    real = model_module.AutoModelForCausalLM.from_pretrained

    def load(source, **kwargs):
        loaded, info = real(source, **kwargs)
        return convert(loaded), info

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", load)
    return loop.train(load_config(None, [
        f"model.name_or_path={directory}", f"data.path={data}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
        "train.progress=false", "eval.generate=0", *overrides]))


def test_a_run_of_such_a_model_trains_with_the_full_head(tmp_path, tokenizer, monkeypatch):
    def needy(loaded):
        model = NeedsEveryPosition(loaded.config)
        model.load_state_dict(loaded.state_dict())
        return model

    summary = train_as(tmp_path, tokenizer, monkeypatch, needy)
    assert not summary["head_at_targets"]["used"] and not summary["chunked_loss"]["used"]
    assert summary["optimizer_steps"] == 2 and summary["eval_loss"]["after"] is not None


def test_the_check_batch_is_cut_to_end_at_each_last_target():
    long = Encoded(list(range(3, 403)), [IGNORE] * 380 + list(range(383, 403)))
    short = Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    batch = check_batch([long, short], pad_id=0)
    assert batch["input_ids"].shape == (2, CHECK_TOKENS)
    assert batch["input_ids"][0, -1] == 402 and (batch["labels"][0] != IGNORE).sum() == 20
    assert batch["input_ids"][1, :4].tolist() == [5, 6, 7, 8]


class Bf16Breaks:
    """Forward hook doing what DBRX's experts do: ``index_add_`` of a linear layer's output
    into an fp32 buffer, which fails when autocast made that output bf16."""

    def __call__(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        flat = h.reshape(-1, h.shape[-1])
        total = torch.zeros_like(flat, dtype=torch.float32)
        total.index_add_(0, torch.arange(flat.shape[0]), flat)
        h = total.view_as(h).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h


def bf16_breaking_model(hook=None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, use_cache=False))
    model.model.layers[0].mlp.down_proj.register_forward_hook(hook or Bf16Breaks())
    return model


def mixed(requested: str) -> Precision:
    return Precision(requested, "bf16-mixed", "measured", 2.0, 1e12, "test")


def small_batch() -> dict:
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_auto_falls_back_to_fp32_where_bf16_fails(caplog):
    model = bf16_breaking_model()
    autocast_forward(model, torch.bfloat16, "cpu")
    chosen = check_trains(model, small_batch(), mixed("auto"), torch.device("cpu"))
    assert chosen.used == "fp32" and chosen.requested == "auto" and chosen.ratio == 2.0
    assert "fails under bf16 autocast (RuntimeError" in chosen.reason
    assert "index_add_" in chosen.reason and "runs in fp32" in chosen.reason
    assert "training in fp32" in caplog.text
    assert compute_dtype(model) == torch.float32  # the autocast is off from now on
    assert check_trains(model, small_batch(), chosen, torch.device("cpu")) is chosen
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradient


def test_a_run_that_auto_put_in_bf16_trains_in_fp32(tmp_path, tokenizer, monkeypatch):
    import leantune.model.precision as precision

    monkeypatch.setattr(precision, "linear_ratio", lambda shapes, device, reps=3: 3.0)
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "cache"))  # not the session's 1.0

    def breaks(loaded):
        loaded.model.layers[0].mlp.down_proj.register_forward_hook(Bf16Breaks())
        return loaded

    summary = train_as(tmp_path, tokenizer, monkeypatch, breaks)
    assert summary["precision"]["used"] == "fp32" and summary["precision"]["ratio"] == 3.0
    assert "fails under bf16 autocast" in summary["precision"]["reason"]
    assert summary["packing"]["probe"]["run_dtype"] == "float32"
    assert summary["mfu"]["compute_dtype"] == "float32" and summary["optimizer_steps"] == 2


def test_asked_for_bf16_that_fails_is_refused_in_one_line():
    model = bf16_breaking_model()
    autocast_forward(model, torch.bfloat16, "cpu")
    with pytest.raises(ConfigError, match=r"train\.precision=bf16-mixed: LlamaForCausalLM "
                                          r"fails under bf16 \(RuntimeError.*use "
                                          r"train\.precision=fp32"):
        check_trains(model, small_batch(), mixed("bf16-mixed"), torch.device("cpu"))


def test_a_model_that_cannot_train_at_all_is_one_line():
    def broken(module, args, output):
        raise ValueError("sequence length 9 has to be a multiple of 4")

    model = bf16_breaking_model(broken)
    fp32 = Precision("fp32", "fp32", "asked for", None, 1e11, "test")
    with pytest.raises(ModelError, match=r"cannot train on this run's first examples: .*"
                                         r"ValueError: sequence length 9 has to be a multiple "
                                         r"of 4 \(test_loss_paths\.py:\d+\)"):
        check_trains(model, small_batch(), fp32, torch.device("cpu"))
