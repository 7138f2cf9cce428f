"""Packing changes nothing the model sees: for several architectures and both CPU
attention backends, packed rows give the per-token logits, loss and gradients of padded
rows; naive packing does not; and a model that cannot keep packed examples apart is
detected and trained padded instead."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig, load_config
from leantune.data.encode import IGNORE, Encoded
from leantune.packing.collate import collate_packed, collate_padded
from leantune.packing.probe import resolve_packing, run_probe
from leantune.train import loop

from conftest import loss_sum, save_tiny_model

LENGTHS = [(9, 3), (4, 1), (14, 5), (6, 2), (11, 4)]  # (tokens, prompt tokens)
BINS = [[2, 1], [4, 0, 3]]  # rows of 18 and 24 tokens: pads in the first row


def make_examples(vocab: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in LENGTHS:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def arch_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(f"pack-{request.param}"), request.param)


def lora(model_dir: str, attn: str) -> nn.Module:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation=attn)
    torch.manual_seed(1)
    model = build_adapter(AdapterConfig(r=4, alpha=8.0, dropout=0.0)).apply(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def packed_logits(model, examples, bins, restart=True) -> list[torch.Tensor]:
    """Per-example logits [n, V] read back out of the packed rows."""
    batch = collate_packed(examples, bins, pad_id=0, restart_positions=restart)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False).logits
    out = {}
    for r, b in enumerate(bins):
        start = 0
        for i in b:
            n = len(examples[i].input_ids)
            out[i] = logits[r, start : start + n]
            start += n
    return [out[i] for i in range(len(examples))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_loss_and_grads_equal_padded(arch_dir, attn):
    model = lora(arch_dir, attn)
    examples = make_examples(model.config.vocab_size)
    padded = collate_padded(examples, pad_id=0)
    ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                use_cache=False).logits
    got = packed_logits(model, examples, BINS)
    for i, e in enumerate(examples):
        torch.testing.assert_close(got[i], ref[i, : len(e.input_ids)], atol=1e-5, rtol=0)

    def loss_and_grads(batch):
        model.zero_grad()
        loss, n = loss_sum(model, batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                  if p.requires_grad}

    loss_p, n_p, g_p = loss_and_grads(padded)
    loss_k, n_k, g_k = loss_and_grads(collate_packed(examples, BINS, pad_id=0))
    assert n_k == n_p == sum(e.num_targets for e in examples)
    torch.testing.assert_close(loss_k, loss_p, atol=1e-4, rtol=1e-6)
    for name in g_p:
        torch.testing.assert_close(g_k[name], g_p[name], atol=1e-5, rtol=1e-4)


def test_naive_packing_contaminates(arch_dir):
    """The parity test above can fail: without restarts, later examples see earlier ones."""
    model = lora(arch_dir, "sdpa")
    examples = make_examples(model.config.vocab_size)
    exact = packed_logits(model, examples, BINS)
    naive = packed_logits(model, examples, BINS, restart=False)
    assert (naive[0] - exact[0]).abs().max() > 1e-3  # example 0 follows example 4 in row 2


def as_rows(examples, bins):
    return [[examples[i] for i in b] for b in bins]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_passes_exact_models(arch_dir, attn):
    model = lora(arch_dir, attn)
    examples = make_examples(model.config.vocab_size)
    report = run_probe(model, [as_rows(examples, BINS)], pad_id=0)
    assert report["exact"] and report["finite"], report
    assert report["errors"]["grads"] < report["tolerance"]["grads"]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients


class PositionBlindLM(nn.Module):
    """A causal LM whose mixer is a running mean over the row (like linear attention or
    a long convolution): it cannot see where a packed example starts."""

    def __init__(self, vocab: int = 50, width: int = 8):
        super().__init__()
        self.config = type("Config", (), {"get_text_config": lambda self: self,
                                          "vocab_size": vocab, "num_hidden_layers": 1,
                                          "hidden_size": width})()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, position_ids=None, use_cache=False, attention_mask=None):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return type("Out", (), {"logits": self.head(h)})()


def test_probe_catches_position_blind_mixers_and_falls_back(caplog):
    torch.manual_seed(0)
    model = PositionBlindLM()
    batches = [as_rows(make_examples(50), BINS)]
    assert run_probe(model, batches, 0)["errors"]["logits"] > 1e-2
    with caplog.at_level(logging.WARNING):
        decision = resolve_packing("online", model, None, batches, 0, max_length=64)
    assert decision["used"] == "none" and not decision["exact"]
    assert "falling back to data.packing=none" in caplog.text


def test_online_training_follows_the_padded_run(llama_dir, tmp_path):
    """The same examples and steps: online packing reproduces padding's loss curve."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "add " + " ".join(str(j) for j in range(i % 9 + 1))},
        {"role": "assistant", "content": f"The answer is {i}."}]}) + "\n" for i in range(40)))
    curves = {}
    for mode in ("none", "online"):
        cfg = load_config(None, [f"model.name_or_path={llama_dir}", f"data.path={data}",
                                 f"train.output_dir={tmp_path / mode}", "train.max_steps=6",
                                 "optim.lr=1e-2", "adapter.dropout=0.0", "train.batch_size=6",
                                 "train.progress=false", f"data.packing={mode}",
                                 "data.max_length=128"])
        summary = loop.train(cfg)
        lines = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().split("\n")
                 if x]
        curves[mode] = ([r["loss"] for r in lines if "loss" in r], summary)
    (loss_n, s_n), (loss_o, s_o) = curves["none"], curves["online"]
    assert loss_o == pytest.approx(loss_n, abs=1e-5)
    assert s_o["eval_loss"]["after"] == pytest.approx(s_n["eval_loss"]["after"], abs=1e-5)
    assert s_o["train_tokens"] == s_n["train_tokens"] and s_o["examples"] == s_n["examples"]
    assert s_o["rows"] < s_n["rows"] and s_o["padding_fraction"] < s_n["padding_fraction"]
    assert s_o["packing"]["used"] == "online"
