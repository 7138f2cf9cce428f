"""The tasks benchmark on a tiny model and fake task files: every variant trains on the
same rows and steps in its own process and is scored on the same documents."""

from __future__ import annotations

import json

import pytest

from leantune.bench.tasks import bench_tasks, format_table


def test_variants_share_rows_steps_and_documents(llama_dir, olmo, tmp_path):
    out = tmp_path / "tasks.json"
    results = bench_tasks(llama_dir, "arc_easy", ["lora_r8", "loreft"],
                          examples=24, eval_docs=6, batch_size=4, max_length=64, steps=2,
                          seeds=2, out=out)
    assert json.loads(out.read_text()) == results
    runs = results["runs"]
    assert [r["seed"] for r in runs["loreft"]] == [42, 43]
    # The same target tokens for every variant of a seed (same rows, batches and steps).
    for k in range(2):
        assert len({rs[k]["train_tokens"]["target"] for rs in runs.values()}) == 1
    assert {r["lr"] for r in runs["loreft"]} == {9e-4}  # the paper's setting
    base = results["base"]
    assert base is not None and base["tasks"]["arc_easy"]["docs"] == 6
    # LoRA starts as the base model exactly, so its "before" is the base's accuracy.
    assert runs["lora_r8"][0]["accuracy"]["before"] == base
    assert "before" not in runs["loreft"][0]["accuracy"]  # scored once, not per run
    s = results["summary"]
    assert s["lora_r8"]["params_vs_lora_r8"] == 1.0
    assert s["loreft"]["params_vs_lora_r8"] > 1.0  # LoReFT trains fewer parameters
    for m in s.values():
        assert len(m["macro_acc"]) == 2
        assert m["macro_acc_mean"] == pytest.approx(sum(m["macro_acc"]) / 2)
    table = format_table(results)
    assert table.count("\n") == 4 and "| base (before) |" in table and "| loreft | 0.0009 |" in table


def test_unknown_variants_are_named():
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['lorax'\]"):
        bench_tasks(variants=["lorax"])
