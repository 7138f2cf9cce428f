"""Preference runs through the training loop: TRL's figures in ``metrics.jsonl``, held-out
pairs scored before and after (DPO exactly log 2 at the start), the three layouts
training alike, every reference mode agreeing, a cached reference surviving a kill, KTO,
the reference-free losses, and Fast Forward on pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.config import ConfigError, load_config

from conftest import Crash, crash_after_checkpoint


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for i in range(36):
        a, b = i % 7, (3 * i) % 5
        rows.append({"prompt": [{"role": "user", "content": f"add {a} and {b}"}],
                     "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                     "rejected": [{"role": "assistant",
                                   "content": f"It is {a + b + 2}, I think." * (1 + i % 2)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(base, data, out, *overrides):
    return load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"train.output_dir={out}",
        "objective.kind=dpo", "train.batch_size=4", "train.max_steps=4", "optim.lr=2e-2",
        "data.eval_examples=8", "data.eval_fraction=0.25", "train.progress=false",
        "eval.generate=0", "adapter.dropout=0", *overrides])


def lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


def step_losses(run_dir) -> list[float]:
    return [r["loss"] for r in lines(run_dir) if "loss" in r and "tag" not in r]


def test_a_dpo_run_logs_trls_figures_and_scores_held_out_pairs(llama_dir, pairs_file,
                                                                tmp_path):
    s = loop.train(config(llama_dir, pairs_file, tmp_path / "run"))
    steps = [r for r in lines(tmp_path / "run") if "loss" in r and "tag" not in r]
    assert len(steps) == 4
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(r[key]) for r in steps), key
    o = s["objective"]
    assert o["kind"] == "dpo" and o["reference"] == "adapter_off" and o["knobs"]["beta"] == 0.1
    assert o["layout"] == {"layout": "packed+shared_prompt", "shared_prompt_check": "exact"}
    before, after = o["held_out"]["before"], o["held_out"]["after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-7)  # reference == policy
    assert before["rewards/margins"] == 0.0 and before["rewards/accuracies"] == 0.0
    assert after["rewards/margins"] > 0 and after["loss"] < math.log(2)  # it learned
    # the adapter-off reference costs one forward per step: between 1/4 and 1/2 of it
    assert 0.2 < o["reference_share"] < 0.5
    assert s["eval_loss"]["before"] == before["loss"]
    assert o["train"]["rewards/margins"] == steps[-1]["rewards/margins"]
    pytest.importorskip("matplotlib")
    from leantune.report import write_report

    page = write_report([tmp_path / "run"])
    assert (page.parent / "preference.png").is_file()


def test_a_model_that_ignores_the_tree_mask_gets_a_row_per_completion(llama_dir, pairs_file,
                                                                       tmp_path, monkeypatch):
    import leantune.train.preference as preference

    monkeypatch.setattr(preference, "check_trees", lambda *a: "the mask was ignored")
    s = loop.train(config(llama_dir, pairs_file, tmp_path / "run", "eval.before=false"))
    assert s["objective"]["layout"] == {"layout": "packed",
                                        "shared_prompt_check": "the mask was ignored"}


def test_the_three_layouts_train_alike(llama_dir, pairs_file, tmp_path):
    runs = {"shared": ["data.packing=online"],
            "packed": ["data.packing=online", "objective.shared_prompt=false"],
            "padded": ["data.packing=none"]}
    losses, layouts = {}, {}
    for name, extra in runs.items():
        s = loop.train(config(llama_dir, pairs_file, tmp_path / name, *extra,
                              "eval.before=false"))
        losses[name], layouts[name] = step_losses(tmp_path / name), s["objective"]["layout"]
    assert layouts["packed"]["layout"] == "packed" and layouts["padded"]["layout"] == "padded"
    for name in ("packed", "padded"):
        assert losses[name] == pytest.approx(losses["shared"], abs=2e-5), name


def test_full_fine_tuning_copy_and_cached_references_agree(llama_dir, pairs_file, tmp_path):
    common = ["adapter.method=full", "optim.lr=1e-3", "eval.before=false"]
    copied = loop.train(config(llama_dir, pairs_file, tmp_path / "copy", *common,
                               "objective.reference=copy"))
    cached = loop.train(config(llama_dir, pairs_file, tmp_path / "cached", *common))
    assert cached["objective"]["reference"] == "cached"
    assert step_losses(tmp_path / "cached") == pytest.approx(step_losses(tmp_path / "copy"),
                                                              abs=2e-5)
    saved = load_file(str(tmp_path / "cached" / "reference_logps.safetensors"))
    assert saved["train"].shape == (28, 2) and "ff" not in saved
    # a cached reference runs no forward in the steps: its FLOPs are the cache's alone,
    # the same for a shorter run; a copy's grow with the steps
    shorter = loop.train(config(llama_dir, pairs_file, tmp_path / "cached2", *common,
                                "train.max_steps=2"))
    assert shorter["objective"]["reference_flops"] == cached["objective"]["reference_flops"]
    ratio = copied["objective"]["reference_share"]
    assert 0.2 < ratio < 0.5 and cached["objective"]["reference_share"] > 0


def test_a_killed_run_with_a_cached_reference_resumes_to_the_same_end(llama_dir, pairs_file,
                                                                     tmp_path, monkeypatch):
    over = ["objective.reference=cached", "train.max_steps=5", "checkpoint.every=2"]
    straight = loop.train(config(llama_dir, pairs_file, tmp_path / "a", *over))
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 2)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, pairs_file, tmp_path / "b", *over))
    cache = (tmp_path / "b" / "reference_logps.safetensors").read_bytes()
    resumed = loop.train(config(llama_dir, pairs_file, tmp_path / "b", *over,
                                "train.resume=true"))
    assert (tmp_path / "b" / "reference_logps.safetensors").read_bytes() == cache
    assert resumed["objective"]["held_out"] == straight["objective"]["held_out"]
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kto_starts_at_one_half_and_logs_its_kl(llama_dir, pairs_file, tmp_path):
    s = loop.train(config(llama_dir, pairs_file, tmp_path / "kto", "objective.kind=kto"))
    o = s["objective"]
    assert o["held_out"]["before"]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert o["held_out"]["after"]["loss"] < 0.5
    steps = [r for r in lines(tmp_path / "kto") if "loss" in r and "tag" not in r]
    assert all(r["kl"] >= 0 for r in steps)
    # TRL's margin: only where a step saw both desirable and undesirable completions
    assert any("rewards/margins" in r for r in steps)
    assert s["data"]["train_examples"] == 2 * 28  # each pair: a desirable and an undesirable


@pytest.mark.parametrize("kind", ["simpo", "orpo", "ipo"])
def test_the_other_pair_losses_train(llama_dir, pairs_file, tmp_path, kind):
    s = loop.train(config(llama_dir, pairs_file, tmp_path / kind, f"objective.kind={kind}"))
    o = s["objective"]
    assert o["held_out"]["after"]["loss"] < o["held_out"]["before"]["loss"]
    if kind != "ipo":  # no reference model: no reference forward anywhere
        assert o["reference"] is None and o["reference_flops"] == 0


def test_fast_forward_runs_on_pairs(llama_dir, pairs_file, tmp_path):
    s = loop.train(config(llama_dir, pairs_file, tmp_path / "ff", "fast_forward.enabled=true",
                          "fast_forward.interval=2", "fast_forward.eval_examples=4",
                          "fast_forward.max_eval_cost=null", "train.max_steps=4"))
    records = [r for r in lines(tmp_path / "ff") if r.get("tag") == "fast_forward"]
    assert s["ff_stages"] == 2 and len(records) == 2
    assert all(math.isfinite(r["ff_loss_before"]) for r in records)
    assert s["data"]["ff_examples"] == 4


def test_an_sft_run_on_pairs_names_the_objective(llama_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="objective.kind=dpo"):
        loop.train(config(llama_dir, pairs_file, tmp_path / "sft", "objective.kind=sft"))
