"""``leantune bench grpo`` end to end on a tiny model: TRL's GRPOTrainer and leantune's two
layouts run the same prompts, and the table reports seconds split into sampling and the
rest, memory and reward curves, with ratios to TRL."""

from __future__ import annotations

import json

import pytest

from leantune.bench.grpo import bench_grpo, format_table, leantune_order
from leantune.data.prompt_sets import problem_source

pytest.importorskip("trl")
pytestmark = pytest.mark.slow


def test_the_bench_runs_both_implementations_and_reports_ratios(llama_dir, tmp_path):
    out = tmp_path / "grpo.json"
    r = bench_grpo(out, model=llama_dir, steps=2, batch_size=2, num_generations=2,
                   max_completion_length=4, rounds=1)
    assert json.loads(out.read_text())["steps"] == 2
    arms = r["arms"]
    assert arms["TRL GRPOTrainer"]["speed_vs_trl"] == 1.0
    assert arms["leantune"]["layout"] == "trees"
    assert arms["leantune, no shared prompt"]["layout"] == "online"
    for name, runs in r["runs"].items():
        assert len(runs[0]["rewards"]) == 2, name
        assert all(x > 0 for x in runs[0]["rollout_seconds"]), name
    assert "TRL GRPOTrainer" in format_table(r)


def test_trl_reads_the_prompts_in_leantunes_order(llama_dir, tmp_path):
    """The file TRL reads sequentially holds, step by step, the prompts leantune's steps
    take: distinct problems, batch_size per step."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r.record) + "\n" for r in problem_source("problems:add")))
    rows = leantune_order(data, llama_dir, 4, 3, 128, 8, 0)
    assert len(rows) == 12 and len({r["prompt"][0]["content"] for r in rows}) == 12
    assert rows == leantune_order(data, llama_dir, 4, 3, 128, 8, 0)
    assert rows != leantune_order(data, llama_dir, 4, 3, 128, 8, 1)
