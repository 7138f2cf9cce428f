"""Fast Forward: the stage on a quadratic whose accepted step count is known in closed form,
revert-on-worsening, its bounds and ledger, and the stage inside the training loop
(frozen weights untouched, the same decisions with and without accumulation, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.config import ConfigError, FastForwardConfig, load_config
from leantune.eval.loss import evaluate
from leantune.model.load import load_model
from leantune.train.fast_forward import (
    FastForward,
    FFLoss,
    ff_set_size,
    halves_loss,
    run_stage,
    split_halves,
    stage_due,
)


def quadratic(params: list[torch.Tensor], target: list[torch.Tensor]):
    """loss = sum ||p - target||^2, evaluated at the current params."""
    return lambda: float(sum(((p - t) ** 2).sum() for p, t in zip(params, target)))


def toy(ratio: float, step: float = 0.125):
    """Two tensors at 0, the minimum at ``ratio`` steps of ``delta`` along it. Along the line
    the loss is |delta|^2 (ratio - k)^2 after k steps, which falls from k - 1 to k exactly
    when k < ratio + 1/2: the stage should accept ceil(ratio + 1/2) - 1 steps."""
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    params = [torch.zeros(3, 4), torch.zeros(5)]
    delta = [step * d for d in direction]
    target = [ratio * d for d in delta]
    return params, delta, target


@pytest.mark.parametrize("ratio, expected", [(7.3, 7), (2.6, 3), (0.4, 0), (11.0, 11)])
def test_accepted_steps_match_the_closed_form(ratio, expected):
    params, delta, target = toy(ratio)
    assert expected == math.ceil(ratio + 0.5) - 1
    stage = run_stage(params, delta, quadratic(params, target), max_steps=100)
    assert stage.accepted == expected
    assert stage.evaluations == expected + 2  # the start, the accepted, the rejected one
    kept = stage.losses[: expected + 1]
    assert all(a > b for a, b in zip(kept, kept[1:])) and stage.losses[-1] >= kept[-1]
    for p, d in zip(params, delta):  # ends exactly at the best point seen
        assert torch.equal(p, torch.zeros_like(d).add(d, alpha=expected))


def test_a_first_step_that_worsens_is_reverted_exactly():
    params, delta, _ = toy(5.0)
    params = [p + torch.rand_like(p) for p in params]
    start = [p.clone() for p in params]
    target = [p - d for p, d in zip(params, delta)]  # delta points away from the minimum
    stage = run_stage(params, delta, quadratic(params, target), max_steps=100)
    assert stage.accepted == 0 and stage.evaluations == 2
    assert stage.loss_after == stage.loss_before
    assert all(torch.equal(p, s) for p, s in zip(params, start))


def test_max_steps_bounds_a_stage():
    params, delta, target = toy(50.0)
    stage = run_stage(params, delta, quadratic(params, target), max_steps=5)
    assert stage.accepted == 5 and stage.evaluations == 6
    assert torch.equal(params[0], torch.zeros(3, 4).add(delta[0], alpha=5))


def test_min_improvement_rejects_small_gains():
    # The k-th step gains |delta|^2 (2 (ratio - k) + 1); demand a little more than the 5th's.
    params, delta, target = toy(7.3)
    norm2 = sum(float((d**2).sum()) for d in delta)
    stage = run_stage(params, delta, quadratic(params, target), max_steps=100,
                      min_improvement=norm2 * (2 * (7.3 - 5) + 1) * 1.01)
    assert stage.accepted == 4
    assert torch.equal(params[1], torch.zeros(5).add(delta[1], alpha=4))


def test_stage_schedule():
    assert [s for s in range(1, 20) if stage_due(s, 0, 6)] == [6, 12, 18]
    assert [s for s in range(1, 20) if stage_due(s, 3, 6)] == [9, 15]
    assert [s for s in range(1, 5) if stage_due(s, 0, 1)] == [1, 2, 3, 4]


def test_fast_forward_uses_the_last_update_and_accounts_its_cost():
    params, delta, target = toy(4.2)
    ff = FastForward(FastForwardConfig(enabled=True, interval=2), params,
                     quadratic(params, target), eval_flops=1000)
    ff.before_step(1)
    assert ff.after_step() is None  # no stage after step 1
    ff.before_step(2)
    for p, d in zip(params, delta):  # what an optimizer step would do
        p.add_(d)
    record = ff.after_step()
    # Starting one step along, the minimum is 3.2 steps away: 3 accepted, 1 reverted.
    assert record["ff_accepted"] == 3 and record["ff_evaluations"] == 5
    numel = sum(p.numel() for p in params)
    assert record["ff_flops"] == 5 * 1000 + 5 * numel  # 4 candidates written + 1 revert
    assert record["ff_loss_after"] < record["ff_loss_before"]
    assert torch.allclose(params[0], 4 * delta[0])


def two_minima(params, delta, near: float, far: float):
    """An FF set whose halves have their minima ``near`` and ``far`` steps along delta."""
    a, b = ([k * d for d in delta] for k in (near, far))
    half_a, half_b = quadratic(params, a), quadratic(params, b)

    def loss() -> FFLoss:
        la, lb = half_a(), half_b()
        return FFLoss((la + lb) / 2, (la, lb))

    return loss


def test_a_step_is_kept_only_when_both_halves_improve():
    # Halves with minima 2 and 7 steps away: the whole set's loss falls until 4.5 steps,
    # but the near half's stops falling after 2 (2.5 - 1/2): the gain past there is one
    # half's alone, as when a tiny FF set's mean "improves" on noise.
    params, delta, _ = toy(0.0)
    stage = run_stage(params, delta, two_minima(params, delta, 2.0, 7.0), max_steps=100)
    assert stage.accepted == 2 and stage.stopped == "disagree"
    assert stage.losses[3] < stage.losses[2]  # the whole set still improved at step 3
    assert torch.equal(params[0], torch.zeros(3, 4).add(delta[0], alpha=2))
    # Where the halves agree, the rule is the plain one.
    params, delta, _ = toy(0.0)
    agree = run_stage(params, delta, two_minima(params, delta, 4.0, 4.2), max_steps=100)
    assert agree.accepted == 4 and agree.stopped == "worse"


def test_evaluation_budget_bounds_a_stage_and_can_skip_it():
    params, delta, target = toy(50.0)
    stage = run_stage(params, delta, quadratic(params, target), max_steps=100, max_evaluations=5)
    assert (stage.accepted, stage.evaluations, stage.stopped) == (4, 5, "cost")
    assert stage.writes == 4  # ended on an accepted point: nothing to revert
    params, delta, target = toy(50.0)
    skipped = run_stage(params, delta, quadratic(params, target), max_steps=100,
                        max_evaluations=1)
    assert (skipped.accepted, skipped.evaluations, skipped.writes) == (0, 0, 0)
    assert skipped.stopped == "skipped" and all(not p.any() for p in params)


def test_stages_are_skipped_where_an_evaluation_costs_about_a_step(caplog):
    """max_eval_cost: an FF step repeats one optimizer step, so where one FF-set
    evaluation costs more than that fraction of the step, no stage runs (said once)."""
    params, delta, target = toy(60.0)
    numel = sum(p.numel() for p in params)
    records = []
    for step_flops in (2 * (1000 + numel) - 1, 2 * (1000 + numel), 3_000_000):
        ps = [p.clone() for p in params]
        ff = FastForward(FastForwardConfig(enabled=True, interval=2), ps,
                         quadratic(ps, target), eval_flops=1000)
        ff.before_step(2)
        for p, d in zip(ps, delta):
            p.add_(d)
        with caplog.at_level("WARNING", logger="leantune.train.fast_forward"):
            records.append(ff.after_step(step_flops))
            ff.before_step(4)
            ff.after_step(step_flops)  # a second stage: no second warning
    assert [r["ff_stopped"] for r in records] == ["skipped", "cost", "worse"]
    assert records[0]["ff_budget"] == 0 and records[0]["ff_flops"] == 0
    assert records[1]["ff_budget"] == 4 and records[2]["ff_accepted"] == 59
    warned = [r for r in caplog.records if "max_eval_cost" in r.getMessage()]
    assert len(warned) == 1 and "costs 0.50 of a training step" in warned[0].getMessage()
    null = FastForward(FastForwardConfig(enabled=True, interval=2, max_eval_cost=None),
                       params, quadratic(params, target), eval_flops=1000)
    assert null.budget(1000) == math.floor(2 * 1000 / (1000 + numel))


def test_stage_cost_never_exceeds_max_cost_times_the_interval_training():
    params, delta, target = toy(60.0)
    numel = sum(p.numel() for p in params)
    for max_cost, step_flops in [(1.0, 10_000), (0.5, 10_000), (2.0, 3_000), (1.0, 500)]:
        ps = [p.clone() for p in params]
        ff = FastForward(FastForwardConfig(enabled=True, interval=2, max_cost=max_cost), ps,
                         quadratic(ps, target), eval_flops=1000)
        ff.before_step(2)
        for p, d in zip(ps, delta):
            p.add_(d)
        record = ff.after_step(step_flops)
        assert record["ff_budget"] == math.floor(max_cost * 2 * step_flops / (1000 + numel))
        assert record["ff_flops"] <= max_cost * 2 * step_flops
        assert record["ff_evaluations"] == (record["ff_budget"] if record["ff_budget"] >= 2
                                            else 0)
    # No step FLOPs given (or max_cost null): no bound, the stage runs to the minimum.
    ff = FastForward(FastForwardConfig(enabled=True, interval=1), params,
                     quadratic(params, target), eval_flops=1000)
    ff.before_step(1)
    for p, d in zip(params, delta):
        p.add_(d)
    assert ff.after_step()["ff_accepted"] == 59


@pytest.mark.parametrize("per_step, expected", [(4, 8), (64, 8), (128, 8), (300, 19),
                                                (512, 32), (4096, 32)])
def test_ff_set_size_follows_the_step(per_step, expected):
    assert ff_set_size(FastForwardConfig(), per_step) == expected
    assert ff_set_size(FastForwardConfig(eval_examples=5), per_step) == 5


def test_halves_balance_targets_and_weigh_to_the_whole_set():
    sizes = [9, 1, 4, 4, 7, 2, 3]
    halves = split_halves(sizes, lambda n: n)
    assert sorted(halves[0] + halves[1]) == sorted(sizes)
    assert abs(sum(halves[0]) - sum(halves[1])) <= max(sizes)
    assert split_halves([5], lambda n: n) == [[5]]
    # A stand-in evaluation: each example's loss is its size, weighted by its size.
    def measure(ex):
        return {"loss": sum(n * n for n in ex) / sum(ex), "target_tokens": sum(ex)}

    got = halves_loss(halves, measure)()
    assert got.loss == pytest.approx(measure(sizes)["loss"], rel=1e-12)
    assert got.parts == tuple(measure(h)["loss"] for h in halves)


def test_a_preference_ff_step_must_not_make_the_chosen_completions_less_likely():
    """The chosen log-prob the objective measured joins the parts, negated: a step that
    lowers the loss while it falls is a "disagree"."""
    from leantune.objectives.base import Objective

    class Figures(Objective):
        def count(self, batch):
            return 1

        def loss_sum(self, model, batch):
            return torch.zeros(())

    objective = Figures()
    calls = {"n": 0}

    def measure(part):  # the loss keeps falling; the chosen log-prob rises, then falls
        objective.tally.add("logps/chosen", torch.tensor([[-5.0, -4.0, -4.5][calls["n"]]]))
        calls["n"] += 1
        return {"loss": 1.0 / calls["n"], "target_tokens": 1}

    fn = halves_loss([[1]], measure, objective)
    assert [fn().parts for _ in range(3)] == [(1.0, 5.0), (0.5, 4.0), (1 / 3, 4.5)]
    assert objective.take_metrics() == {}  # FF's figures stay out of the steps' tally
    params, delta, _ = toy(0.0)
    calls["n"] = 0
    stage = run_stage(params, delta, halves_loss([[1]], measure, objective), max_steps=10)
    assert stage.accepted == 1 and stage.stopped == "disagree"


@pytest.mark.parametrize("key, value", [("fast_forward.max_cost", "0"),
                                        ("fast_forward.eval_examples", "0")])
def test_bad_ff_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


# ---------------------------------------------------------------------------------------
# In the training loop

# Tiny steps make an FF-set evaluation cost about a step: max_eval_cost would skip every
# stage (its own test shows that), so these tests of the stage mechanics lift it.
FF = ["fast_forward.enabled=true", "fast_forward.interval=3", "fast_forward.eval_examples=6",
      "fast_forward.max_eval_cost=null", "schedule.kind=constant", "optim.lr=3e-3",
      "data.packing=none", "adapter.dropout=0"]


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    """48 distinct rows of "add a b" -> "The answer is a+b." as chat messages."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with path.open("w") as f:
        for i in range(48):
            a, b = 7 * i % 50, i
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"add {a} {b}"},
                {"role": "assistant", "content": f"The answer is {a + b}."}]}) + "\n")
    return str(path)


def config(model_dir, data, out, *overrides: str):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.path={data}",
                              "data.eval_fraction=0.25", f"train.output_dir={out}",
                              "train.batch_size=4", "train.progress=false", *FF, *overrides])


def train_keeping_the_run(cfg, monkeypatch) -> tuple[dict, loop.Run]:
    built = []
    real = loop.build_run
    monkeypatch.setattr(loop, "build_run", lambda c: built.append(real(c)) or built[-1])
    return loop.train(cfg), built[-1]


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_loop_ledger_and_frozen_weights(adapter, llama_dir, sums, tmp_path, monkeypatch):
    cfg = config(llama_dir, sums, tmp_path / "run", "train.max_steps=9",
                 f"adapter.use_dora={adapter == 'dora'}")
    summary, run = train_keeping_the_run(cfg, monkeypatch)
    assert [id(p) for p in run.ff.params] == [id(p) for p in run.model.parameters()
                                               if p.requires_grad]
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) == (adapter == "dora")
    assert summary["ff_stages"] == 3 and len(summary["ff_accepted_per_stage"]) == 3
    assert summary["ff_steps_accepted"] == sum(summary["ff_accepted_per_stage"]) > 0
    assert summary["data"]["ff_examples"] == 6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("tag") == "fast_forward"]
    assert [r["step"] for r in records] == [3, 6, 9]
    assert summary["ff_flops"] == sum(r["ff_flops"] for r in records) > 0
    assert all(r["ff_loss_after"] <= r["ff_loss_before"] for r in records)
    # Only adapter tensors moved: the base weights inside the trained model are the base's.
    base = load_model(cfg.model, llama_dir).state_dict()
    for name, value in run.model.state_dict().items():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(value, base[key]), name


def test_same_decisions_with_and_without_accumulation(llama_dir, sums, tmp_path):
    # Accumulation changes the update only by float rounding (~1e-7); near the end of a
    # stage the loss is flat along delta, so a margin keeps that rounding from deciding.
    margin = "fast_forward.min_improvement=1e-3"
    one = loop.train(config(llama_dir, sums, tmp_path / "a", "train.max_steps=6", margin))
    acc = loop.train(config(llama_dir, sums, tmp_path / "b", "train.max_steps=6", margin,
                            "train.batch_size=2", "train.grad_accum=2"))
    assert one["ff_accepted_per_stage"] == acc["ff_accepted_per_stage"]
    assert one["ff_steps_accepted"] > 0
    assert one["eval_loss"]["after"] == pytest.approx(acc["eval_loss"]["after"], abs=1e-5)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ff_set_is_disjoint_from_train_and_eval(llama_dir, sums, tmp_path):
    run = loop.build_run(config(llama_dir, sums, tmp_path / "run"))
    ff, train, held = ({tuple(e.input_ids) for e in s}
                       for s in (run.data.ff, run.data.batcher.examples,
                                 run.data.eval_sets[0].examples))
    assert len(ff) == 6 and len(train) + len(held) + len(ff) == 48
    assert not ff & train and not ff & held


def test_ff_loss_is_the_whole_sets_and_default_size_follows_the_batch(llama_dir, sums, tmp_path):
    # eval_examples unset: the default, ceil(4 / 16) held to at least 8.
    cfg = config(llama_dir, sums, tmp_path / "run", "fast_forward.eval_examples=null")
    run = loop.build_run(cfg)
    assert len(run.data.ff) == 8
    got = run.ff.loss_fn()
    whole = evaluate(run.model, run.data.ff, 3, lambda b: run.data.batcher.collate_examples(
        b, "none"), run.acc)["loss"]
    assert len(got.parts) == 2 and got.loss == pytest.approx(whole, rel=1e-6)


def test_loop_passes_step_flops_to_the_stage_budget(llama_dir, sums, tmp_path):
    cfg = config(llama_dir, sums, tmp_path / "run", "train.max_steps=6",
                 "fast_forward.max_cost=1e-6")
    summary = loop.train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("tag") == "fast_forward"]
    assert [r["ff_stopped"] for r in records] == ["skipped", "skipped"]
    assert summary["ff_flops"] == 0 and summary["ff_steps_accepted"] == 0
    assert all(r["ff_budget"] == 0 and r["ff_evaluations"] == 0 for r in records)
