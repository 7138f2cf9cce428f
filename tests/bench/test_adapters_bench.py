"""The adapters benchmark on a tiny model: every method runs in its own process on the
same task and token budget, and the table reports what each trained."""

from __future__ import annotations

import json

import pytest

from leantune.bench.adapters import bench_adapters, format_table


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "add.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 10} {(7 * i) % 10}"},
        {"role": "assistant", "content": f"The answer is {i % 10 + (7 * i) % 10}."}]}) + "\n"
        for i in range(40)))
    return str(path)


def test_methods_share_the_token_budget_and_report_their_own_figures(llama_dir, data_file,
                                                                     tmp_path):
    out = tmp_path / "adapters.json"
    results = bench_adapters(llama_dir, data_file, ["lora", "prompt_tuning", "full"],
                             examples=40, eval_examples=8, batch_size=4, max_length=64,
                             steps=3, out=out)
    assert json.loads(out.read_text()) == results
    med = results["median"]
    # Same examples, batches and steps: the same target tokens for every method.
    assert len({m["train_tokens"]["target"] for m in med.values()}) == 1
    assert all(m["optimizer_steps"] == 3 for m in med.values())
    assert [med[m]["optim_lr"] for m in ("lora", "prompt_tuning", "full")] == [2e-4, 3e-2, 2e-5]
    assert med["full"]["trainable_params"] == med["full"]["total_params"]
    assert med["prompt_tuning"]["trainable_params"] < med["lora"]["trainable_params"]
    assert med["prompt_tuning"]["packing"]["used"] == "none"
    assert med["full"]["speed_vs_full"] == 1.0 and med["lora"]["speed_vs_lora"] == 1.0
    for m in med.values():
        mem = m["train_memory_bytes"]
        assert 0 < mem["at_start"] <= mem["peak"] <= m["peak_memory_bytes"]
        assert m["eval_loss_after"] > 0
    table = format_table(results)
    assert table.count("\n") == 4 and "| prompt_tuning | 0.03 |" in table
    assert all(m["seed"] == 42 for rs in results["runs"].values() for m in rs)


def test_unknown_methods_are_named():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['lorax'\]"):
        bench_adapters(methods=["lorax"])


def test_rounds_are_summarized_by_medians_with_the_eval_loss_spread():
    from leantune.bench.adapters import summarize

    def run(tps, loss, seed):
        return {"tokens_per_second": tps, "peak_memory_bytes": 10, "train_seconds": 100 / tps,
                "train_memory_bytes": {"at_start": 4, "peak": 8}, "eval_loss_before": 2.0,
                "eval_loss_after": loss, "trainable_params": 5, "seed": seed}

    med = summarize({"lora": [run(10, 1.5, 42), run(30, 1.7, 43), run(20, 1.6, 44)],
                     "full": [run(5, 1.4, 42)]})
    assert med["lora"]["tokens_per_second"] == 20 and med["lora"]["eval_loss_after"] == 1.6
    assert med["lora"]["eval_loss_after_range"] == [1.5, 1.7]
    assert med["lora"]["speed_vs_full"] == 4.0 and med["full"]["speed_vs_lora"] == 0.25
