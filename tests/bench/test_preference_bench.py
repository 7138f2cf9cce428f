"""``leantune bench preference`` end to end on a tiny model and the fake task data: TRL's
DPOTrainer and leantune's three layouts train the same pairs in the same order (so their
losses agree), every objective is scored the same way, and Fast Forward's saving is
measured against the plain run."""

from __future__ import annotations

import json

import pytest

from leantune.bench.preference import bench_preference, format_tables

pytest.importorskip("trl")
pytestmark = pytest.mark.slow


def test_the_bench_runs_every_part_and_reports_ratios(olmo, llama_dir, tmp_path):
    out = tmp_path / "preference.json"
    r = bench_preference(llama_dir, out=out, speed_steps=2, rounds=1, quality_steps=2,
                         seeds=(0,), adapters=("lora",), task_examples=4, held_out=6,
                         ff_steps=3, max_length=128, batch_size=4, tasks="arc-e",
                         speed_pairs=12)
    assert json.loads(out.read_text())["speed"]["setup"]["steps"] == 2
    speed = r["speed"]["median"]
    assert speed["TRL DPOTrainer"]["speed_vs_trl"] == 1.0
    layouts = {name: m["layout"] for name, m in speed.items()}
    assert layouts["leantune packed+shared prompt"] == "packed+shared_prompt"
    assert layouts["leantune padded"] == "padded"
    # same pairs, same order, the reference equal to the policy at the start: log 2 for all
    for m in speed.values():
        assert m["losses"][0] == pytest.approx(0.6931, abs=1e-3)
    arms = r["quality"]["arms"]
    assert set(arms) == {"base", "sft lora seed 0", "dpo lora seed 0", "simpo lora seed 0",
                         "orpo lora seed 0"}
    assert all(a["pairs"] == 6 and 0 <= a["pair_accuracy"] <= 1 for a in arms.values())
    ff = r["fast_forward"]
    assert ff["target"]["step"] == 3 and ff["ff"]["optimizer_steps"] == 3
    table = format_tables(r)
    assert "TRL DPOTrainer" in table and "dpo lora seed 0" in table
