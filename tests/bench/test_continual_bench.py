"""The continual pre-training benchmark on tiny corpora: every run is a real ``leantune
train`` process, continued runs start from the pretrained one, and the table's figures
follow from the runs' own summaries."""

from __future__ import annotations

import json

import pytest

from leantune.bench.continual import bench_continual, format_table, slug


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    words = "the quick brown fox jumps over a lazy dog hello how are you".split()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": " ".join(
        words[(i * k) % len(words)] for k in range(30))}) + "\n" for i in range(60)))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": "\n".join(
        f"def f{i}_{k}(a, b):\n    return a + b * {k}" for k in range(4))}) + "\n"
        for i in range(60)))
    return str(root / "a.jsonl"), str(root / "b.jsonl")


def test_pretrain_continue_with_replay_and_union(corpora, tmp_path):
    out = tmp_path / "continual.json"
    results = bench_continual(*corpora, steps_a=4, steps_b=3, ratios=(0.0, 0.25), batch_size=4,
                              max_length=32, eval_every=2, eval_tokens=128, vocab=400,
                              work=tmp_path / "work", out=out, plot=tmp_path / "plot.png")
    assert json.loads(out.read_text()) == results
    runs = results["runs"]
    assert list(runs) == ["pretrain A", "A -> B, replay 0%", "A -> B, replay 25%",
                          "union A+B (from scratch)"]
    pre = runs["pretrain A"]
    for name in ("A -> B, replay 0%", "A -> B, replay 25%"):
        r = runs[name]
        assert r["start"]["kind"] == "init" and r["start"]["checkpoint"].endswith(
            f"{slug('pretrain A')}/checkpoints/step-4")
        # Continued runs start exactly where pretraining ended, on the same held-out text.
        assert r["eval_sets"]["english"]["before"] == pre["eval_sets"]["english"]["after"]
        assert r["optimizer_steps"] == 3
    assert runs["A -> B, replay 25%"]["replay"]["windows"] == {"data": 9, "replay": 3}
    assert runs["A -> B, replay 0%"]["replay"]["windows"] == {"data": 12}
    union = runs["union A+B (from scratch)"]
    assert union["optimizer_steps"] == 7 and union["start"]["kind"] == "fresh"
    rows = {r["run"]: r for r in results["table"]}
    forgetting = rows["A -> B, replay 0%"]["forgetting_A"]
    assert forgetting == pytest.approx(runs["A -> B, replay 0%"]["eval_sets"]["english"][
        "after"]["loss"] - pre["eval_sets"]["english"]["after"]["loss"])
    # Compute counts the pretraining a continued run inherits; the union pays for its own.
    assert rows["A -> B, replay 0%"]["tokens_total"] == 7 * 4 * 32 == rows[
        "union A+B (from scratch)"]["tokens_total"]
    assert rows["pretrain A"]["forgetting_A"] is None
    table = format_table(results)
    assert table.count("\n") == 5 and "| A -> B, replay 25% |" in table
    assert (tmp_path / "plot.png").stat().st_size > 10_000
