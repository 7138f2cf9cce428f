"""The start-up check of the loss's shortcuts: both stay on where they equal the model's
own full-logits loss; the chunked loss goes off after Gemma-2's soft-capping; the head
at target positions goes off for a model whose code after the head needs every
position, and the run then trains on the full head - a warning, never a traceback."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, LlamaForCausalLM

from leantune.config import load_config
from leantune.data.encode import IGNORE, Encoded
from leantune.train import loop
from leantune.train.chunked_loss import chunked_head
from leantune.train.loss_paths import CHECK_TOKENS, check_batch, check_loss_paths
from leantune.train.step import forward_loss, loss_sum
from test_head import arch_dirs, build, packed_batch  # noqa: F401


def test_both_stay_on_where_exact(arch_dirs):
    model, adapter = build(arch_dirs["llama"], "lora")
    batch = packed_batch(model.config.vocab_size, adapter)
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
        torch.testing.assert_close(loss_sum(model, batch)[0], forward_loss(model, batch)[1])


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
        logits, loss, _ = forward_loss(model, batch)
        _, full, _ = forward_loss(model, batch, full_logits=True)
    assert logits.dim() == 3 and torch.equal(loss, full)


def test_a_run_of_such_a_model_trains_with_the_full_head(tmp_path, tokenizer, monkeypatch):
    directory = tmp_path / "needy"
    model = tiny_needy()
    model.config.vocab_size = len(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q {i} " * (i % 4 + 1),
                                        "completion": f" a{i}"}) + "\n" for i in range(16)))
    # Loaded through AutoModelForCausalLM, the class is Llama's: register ours for the test.
    import leantune.model as model_module

    real = model_module.AutoModelForCausalLM.from_pretrained

    def load(source, **kwargs):
        loaded, info = real(source, **kwargs)
        needy = NeedsEveryPosition(loaded.config)
        needy.load_state_dict(loaded.state_dict())
        return needy, info

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", load)
    summary = loop.train(load_config(None, [
        f"model.name_or_path={directory}", f"data.path={data}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
        "train.progress=false", "eval.generate=0"]))
    assert not summary["head_at_targets"]["used"] and not summary["chunked_loss"]["used"]
    assert summary["optimizer_steps"] == 2 and summary["eval_loss"]["after"] is not None


def test_the_check_batch_is_cut_to_end_at_each_last_target():
    long = Encoded(list(range(3, 403)), [IGNORE] * 380 + list(range(383, 403)))
    short = Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    batch = check_batch([long, short], pad_id=0, intervene=None)
    assert batch["input_ids"].shape == (2, CHECK_TOKENS)
    assert batch["input_ids"][0, -1] == 402 and (batch["labels"][0] != IGNORE).sum() == 20
    assert batch["input_ids"][1, :4].tolist() == [5, 6, 7, 8]
