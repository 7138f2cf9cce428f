"""The tasks benchmark on a tiny model and fake task files: every variant trains on the
same rows and steps in its own process and is scored on the same documents."""

from __future__ import annotations

import json

import pytest

from leantune.bench.tasks import (
    VARIANTS,
    bench_tasks,
    format_table,
    split_variants,
    variant_overrides,
)


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


@pytest.mark.parametrize("bad", ["lorax", "loreft@optim.lr", "lorax@optim.lr=1"])
def test_unknown_variants_are_named(bad):
    with pytest.raises(ValueError, match=f"unknown variant '{bad}'"):
        bench_tasks(variants=["lora_r8", bad])


def test_a_variant_takes_overrides_after_its_name():
    # Later overrides win in load_config, so the sweep's setting replaces the variant's.
    got = variant_overrides("loreft@optim.lr=3e-3@adapter.r=4")
    assert got == [*VARIANTS["loreft"], "optim.lr=3e-3", "adapter.r=4"]
    from leantune.config import load_config
    cfg = load_config(None, got)
    assert cfg.optim.lr == 3e-3 and cfg.adapter.r == 4 and cfg.adapter.method == "loreft"


def test_variant_lists_keep_bracketed_commas():
    got = split_variants("lora_r8,loreft@adapter.layers=[0,10,20]@optim.lr=1e-3,direft")
    assert got == ["lora_r8", "loreft@adapter.layers=[0,10,20]@optim.lr=1e-3", "direft"]
    from leantune.config import load_config
    assert load_config(None, variant_overrides(got[1])).adapter.layers == [0, 10, 20]
