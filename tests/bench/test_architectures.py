"""A CI-sized slice of ``leantune bench architectures``: a dozen architectures chosen for
their traps, each trained by ``leantune train`` with its defaults (packed, LoRA on its
default targets, the chunked loss, the head-at-targets hook) under fp32 and bf16-mixed.
Each must train (no traceback, no refusal, never packed where packing is inexact), in
the layout known to be right where one is."""

from __future__ import annotations

import json

import pytest

import leantune.report
from leantune.bench.architectures import run_architecture, run_line
from leantune.bench.tiny_models import VARIANTS, build_tiny, tiny_config
from leantune.cli import main

# name -> what every run must end in: "exact" (trained packed) or "padded" (trained
# padded, for the reason the run gives). Packing is judged in fp32 whatever the precision,
# so both precisions must decide alike; a needless fallback fails here as a leak would.
SLICE = {
    "llama": "exact",                             # the baseline
    "gemma3n_text": "padded",                     # per-layer sizes; a pad segment's NaN grads
    "phi3 long-rope (Phi-3.5-mini)": "exact",     # pad tails raise the largest position
    "llama4_text floor_scale=16": "padded",       # attention scaled by the index in the row
    "gemma2": "exact",                            # final logit soft-capping (chunked loss off)
    "qwen3_moe": "exact",                         # mixture of experts
    "lfm2 conv + attention (LFM2-350M)": "padded",  # convolutions cross examples
    "gpt2": "exact",                              # Conv1D layers (LoRA's fan_in_fan_out)
    "opt": "padded",                              # learned positions offset by the mask
    "cohere": "exact",                            # logits scaled (chunked loss off)
    "mistral": "exact",                           # sliding window
    "deepseek_v3": "exact",                       # latent attention, fused experts (no dropout)
}
PRECISIONS = ("fp32", "bf16-mixed")  # tests force auto to fp32: bf16 is asked for by name
# Shorter replies than the sweep's: the verdicts never depend on them.
SLICE_RUN = ("eval.max_new_tokens=8",)


@pytest.mark.parametrize("kind", SLICE)
def test_trains_through_the_command_without_a_bug(kind, tmp_path, monkeypatch):
    # The report (plots: half of a tiny run) only reads the finished run, and a failing
    # one is logged, not raised: it can change no verdict.
    monkeypatch.setattr(leantune.report, "report_after_training", lambda run_dir: None)
    model_type, changes = VARIANTS.get(kind, (kind, None))
    record = run_architecture(model_type, changes, main, tmp_path, PRECISIONS, ("lora",),
                              SLICE_RUN)
    assert "runs" in record, f"{kind} not built: {record.get('why')}"
    lines = "\n".join(run_line(kind, key, run) for key, run in record["runs"].items())
    assert {r["verdict"] for r in record["runs"].values()} == {SLICE[kind]}, lines


def test_gemma3n_keeps_its_per_layer_lists():
    """Gemma-3n's real configs give intermediate_size per layer: the tiny one does too,
    and shares the first layers' keys and values with the last ones."""
    config = tiny_config("gemma3n_text", vocab=300)
    assert config.intermediate_size == [128] * config.num_hidden_layers
    assert len(config.layer_types) == config.num_hidden_layers == 4
    assert config.num_kv_shared_layers == 2
    assert isinstance(build_tiny("gemma3n_text", vocab=300).config.intermediate_size, list)


def test_the_bench_command_writes_verdicts_counts_and_the_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(leantune.report, "report_after_training", lambda run_dir: None)
    out = tmp_path / "architectures.json"
    assert main(["bench", "architectures", "--only", "llama,nope", "--precisions", "fp32",
                 "--methods", "lora", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["cpu"]["model"] and "flags" in results["cpu"]
    assert results["transformers"] and "--only 'llama,nope'" in results["command"]
    assert results["counts"] == {"fp32/lora": {"exact": 1}, "not built": 1,
                                 "needless padding": 0}
    llama = results["results"]["llama"]
    assert llama["runs"]["fp32/lora"]["packing"] == "online"
    assert llama["checks"]["lora"]["exact"] and llama["rss_mb"]
    assert results["results"]["nope"]["verdict"] == "not built"
    printed = capsys.readouterr().out
    assert "llama" in printed and "fp32/lora" in printed and "not built: 1" in printed
