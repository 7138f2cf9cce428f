"""The packing probe and the traps it exists for: pad tails that raise the batch's largest
position (Phi-3 long-RoPE), attention scaled by the index in the row (Llama-4), pad
segments whose backward is undefined (NaN gradients), and what a run reports and says."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Llama4TextConfig, LlamaConfig, Phi3Config

from leantune.bench.packing_check import examples as random_examples
from leantune.config import load_config
from leantune.data.encode import Encoded
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_packed, collate_padded, pad_positions
from leantune.packing.probe import (
    full_width_rows,
    probe_batches,
    resolve_packing,
    row_index_hazard,
    run_probe,
)
from leantune.train import loop
from leantune.train.step import StepResult

from conftest import loss_sum

VOCAB = 300


def make(lengths: list[int], seed: int = 0) -> list[Encoded]:
    """Random examples (ids 5 and up), the first third of each a prompt."""
    return random_examples(VOCAB, lengths, seed)


def rows_of(examples: list[Encoded], bins: list[list[int]]) -> list[list[Encoded]]:
    return [[examples[i] for i in b] for b in bins]


def tiny(config) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval()


def test_pad_positions_never_exceed_the_longest_example():
    assert pad_positions(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    batch = collate_packed(make([40, 40, 40, 6]), [[0, 1, 2], [3]], pad_id=0)
    assert int(batch["position_ids"].max()) == 39  # the pad tail is 114 long


# Phi-3.5-mini's long-RoPE, shrunk: long factors whenever max(position_ids) + 1 > 90.
PHI3 = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
                  initializer_range=0.1,  # peaky attention: rope changes show in the loss
                  original_max_position_embeddings=90,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0] * 4, "long_factor": [6.0] * 4,
                                   "original_max_position_embeddings": 90})
# 8 rows of 128: one packed full, seven single examples with pad tails of 98-123 tokens,
# each longer than every example of the batch (40 at most).
PHI3_LENGTHS = [40, 40, 40, 8, 5, 9, 12, 17, 21, 25, 30]
PHI3_BINS = [[0, 1, 2, 3]] + [[i] for i in range(4, 11)]


def test_phi3_long_rope_pad_tails_longer_than_every_example_stay_inert():
    model = tiny(PHI3)
    examples = make(PHI3_LENGTHS)
    padded, packed = collate_padded(examples, 0), collate_packed(examples, PHI3_BINS, 0)
    ref, _ = loss_sum(model, padded)
    got, _ = loss_sum(model, packed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    # The trap is real: pad positions 0..n (as before) flip the batch to the long factors.
    widths = [sum(PHI3_LENGTHS[i] for i in b) for b in PHI3_BINS]
    for r, w in enumerate(widths):
        packed["position_ids"][r, w:] = torch.arange(128 - w)
    old, _ = loss_sum(model, packed)
    assert abs(float(old - ref)) / float(ref) > 1e-4
    report = run_probe(model, [rows_of(examples, PHI3_BINS)], 0)
    assert report["exact"], report


LLAMA4 = dict(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              vocab_size=VOCAB, num_local_experts=2, num_experts_per_tok=1, pad_token_id=0,
              no_rope_layers=[1, 0], floor_scale=16, attn_temperature_tuning=True)


def test_llama4_temperature_from_the_row_index_falls_back_with_the_reason(caplog):
    model = tiny(Llama4TextConfig(**LLAMA4))
    rows = rows_of(make([30, 20, 14, 9]), [[0, 1, 2], [3]])  # 64 wide, past floor_scale
    with caplog.at_level(logging.WARNING):
        decision = resolve_packing("online", model, None, [rows], 0, max_length=64)
    assert decision["used"] == "none" and "floor_scale=16" in decision["reason"]
    assert "floor_scale=16" in caplog.text and "falling back to data.packing=none" in caplog.text
    # Not a false alarm: in fp32 the probe itself sees it on rows past floor_scale ...
    assert not run_probe(model, [rows], 0)["exact"]
    # ... and rows that never reach floor_scale pack exactly.
    short = rows_of(make([6, 5, 4]), [[0, 1], [2]])
    assert row_index_hazard(model.config, max_length=15) is None
    assert resolve_packing("online", model, None, [short], 0, max_length=15)["used"] == "online"


class NoEpsNorm(nn.Module):
    """``x / (sqrt(mean(x^2)) + eps)``: finite at x = 0, but its backward is 0 * inf there."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)


def nan_prone_llama() -> nn.Module:
    """A Llama whose pad embedding is zero (``padding_idx``) and whose final norm has no
    eps inside the root: a pad segment attending only to itself stays exactly zero."""
    model = tiny(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                             pad_token_id=0))
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 0
    model.model.norm = NoEpsNorm(32)
    return model


def test_probe_catches_nan_gradients_of_a_pad_segment_and_falls_back():
    model = nan_prone_llama()
    examples = make([20, 12, 7])
    with_tail = rows_of(examples, [[0, 1], [2]])  # row 2 has a 25-token pad tail
    report = run_probe(model, [with_tail], 0)
    assert not report["finite"] and report["padded_finite"] and not report["exact"]
    assert "not finite where padded ones are" in report["reason"]
    decision = resolve_packing("online", model, None, [with_tail], 0, max_length=32)
    assert decision["used"] == "none"
    # Forward only, the same batch passes: only the backward shows it.
    assert run_probe(model, [with_tail], 0, backward=False)["exact"]
    # And it is the pad segment: rows without one pack exactly.
    assert run_probe(model, [rows_of(examples, [[0, 2], [1]])[:1]], 0)["exact"]


def test_probe_batches_cover_the_full_width_and_a_long_pad_tail():
    lengths = [60, 45, 30, 12, 9, 5]
    first = rows_of(make(lengths), pack_batch(lengths, 128))
    batches = probe_batches(first, 128)
    assert batches[0] is first and len(batches) == 2
    full, short = batches[1]
    assert sum(len(e.input_ids) for e in full) == 128 and len(full) >= 2
    assert len(short) == 1 and len(short[0].input_ids) <= 32
    # A first batch of single full-width examples is padding's own layout: not probed.
    alone = rows_of(make([64, 64]), [[0], [1]])
    assert probe_batches(alone, 64) == [full_width_rows([e for r in alone for e in r], 64)]


def test_a_run_reports_what_was_probed_and_its_cost(llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {' '.join(['x'] * (i % 11 + 1))}",
                                        "completion": f" {i}"}) + "\n" for i in range(30)))
    cfg = load_config(None, [f"model.name_or_path={llama_dir}", f"data.path={data}",
                             f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                             "train.progress=false", "data.max_length=64", "eval.generate=0"])
    summary = loop.train(cfg)
    packing = summary["packing"]
    assert packing["used"] == "online" and packing["exact"]
    probe = packing["probe"]
    assert probe["backward"] and probe["dtype"] == "float32" and probe["flops"] > 0
    assert probe["seconds"] > 0 and max(b["width"] for b in probe["batches"]) == 64
    assert probe["errors"]["grads"] < probe["tolerance"]["grads"]


def test_a_nonfinite_first_packed_step_names_packing_before_the_lr(llama_dir, tmp_path,
                                                                    monkeypatch):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n"
                            for i in range(20)))
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: StepResult(1.0, 8, float("nan"),
                                                                        applied=False))
    cfg = load_config(None, [f"model.name_or_path={llama_dir}", f"data.path={data}",
                             f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                             "train.progress=false", "eval.generate=0", "eval.before=false"])
    with pytest.raises(FloatingPointError, match=r"step 1 with data\.packing=online.*packed "
                                                 r"rows are the likely cause.*data\.packing=none"):
        loop.train(cfg)
