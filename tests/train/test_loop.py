"""The training loop end to end on tiny models: the loss falls, the summary holds the
figures the run directory promises (and they add up), and an interrupted run resumed from its
checkpoint ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.adapters import build_adapter
from leantune.config import load_config
from leantune.data.dataset import build_splits
from leantune.model.flops import FlopModel
from leantune.model.load import load_model, load_tokenizer
from leantune.packing.batching import epoch_batches
from leantune.train.run_dir import RunDirError

from conftest import Crash, NanLoss, crash_after_checkpoint

SUMMARY_KEYS = {"method", "model", "train_tokens", "optimizer_steps", "train_flops", "ff_flops",
                "ff_stages", "ff_steps_accepted", "wall_seconds", "tokens_per_second",
                "peak_memory_bytes", "trainable_params", "total_params", "eval_loss",
                "padding_fraction"}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """48 rows of "add a b" -> "The answer is a+b." as chat messages."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    with path.open("w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"add {a} {b}"},
                {"role": "assistant", "content": f"The answer is {a + b}."}]}) + "\n")
    return str(path)


def config(model_dir: str, data: str, out, *overrides: str):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.path={data}",
                              "data.eval_fraction=0.25", f"train.output_dir={out}",
                              "train.batch_size=4", "train.progress=false",
                              *overrides])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_summary_is_complete(tiny_model_dir, chat_data, tmp_path):
    cfg = config(tiny_model_dir, chat_data, tmp_path / "run", "train.max_steps=30",
                 "optim.lr=1e-2")
    summary = loop.train(cfg)

    assert SUMMARY_KEYS <= summary.keys()
    memory = summary["train_memory_bytes"]
    assert 0 < memory["at_start"] <= memory["peak"] <= summary["peak_memory_bytes"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()).keys() == summary.keys()
    before, after = summary["eval_loss"]["before"], summary["eval_loss"]["after"]
    # A random tiny model starts near ln(vocab) = 5.7; 30 steps take ~0.6 off (seeded).
    assert after < before - 0.25, (before, after)
    assert summary["method"] == "lora" and summary["model"] == tiny_model_dir
    assert summary["optimizer_steps"] == 30
    assert 0 < summary["train_tokens"]["target"] < summary["train_tokens"]["total"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["train_flops"] > 0 and summary["tokens_per_second"] > 0
    assert summary["peak_memory_bytes"] > 0 and summary["wall_seconds"] > 0
    assert 0 <= summary["padding_fraction"] < 1
    assert (summary["ff_flops"], summary["ff_stages"], summary["ff_steps_accepted"]) == (0, 0, 0)

    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = (sum(r["loss"] for r in part) / 5 for part in (train[:5], train[-5:]))
    assert last < first - 0.25, (first, last)
    assert train[-1]["target_tokens"] == summary["train_tokens"]["target"]
    assert train[-1]["train_flops"] == summary["train_flops"]
    evals = [(r["tag"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert evals == [("before", before), ("after", after)]


def test_one_epoch_accounts_every_example_once(llama_dir, chat_data, tmp_path):
    """Tokens, padding and FLOPs in the summary, recomputed from the data and the batches."""
    cfg = config(llama_dir, chat_data, tmp_path / "run", "train.grad_accum=3",
                 "eval.before=false", "data.packing=none")
    summary = loop.train(cfg)
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
    train = splits.train
    batches = epoch_batches(len(train), 4, cfg.train.seed, 0)
    assert (len(train), len(batches)) == (36, 9)
    assert summary["optimizer_steps"] == 3
    real = sum(len(e.input_ids) for e in train)
    assert summary["train_tokens"] == {"target": sum(e.num_targets for e in train), "total": real}
    shapes = [(len(b), max(len(train[i].input_ids) for i in b)) for b in batches]
    positions = sum(rows * length for rows, length in shapes)
    assert summary["padding_fraction"] == pytest.approx(1 - real / positions)
    fm = FlopModel.of(build_adapter(cfg.adapter).apply(load_model(cfg.model)))
    heads = [sum(train[i].num_targets for i in b) for b in batches]  # the head's positions
    assert summary["train_flops"] == sum(fm.train(r, t, h) for (r, t), h in zip(shapes, heads))
    assert summary["train_flops"] < sum(fm.train(r, t) for r, t in shapes)


def adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures."""
    timing = {"tokens_per_second", "elapsed_seconds", "ff_seconds", "compute_seconds",
              "peak_memory_bytes"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(llama_dir, chat_data, tmp_path_factory):
    """6 steps (2 micro-batches each, LoRA dropout 0.1, cosine), checkpoint every 3, and a
    Fast Forward stage every 2 steps (so one lands on each side of the crash)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    overrides = ["train.max_steps=6", "train.grad_accum=2", "checkpoint.every=3",
                 "adapter.dropout=0.1", "optim.lr=1e-2", "eval.every=2",
                 "fast_forward.enabled=true", "fast_forward.interval=2",
                 "fast_forward.eval_examples=4"]
    return overrides, out, loop.train(config(llama_dir, chat_data, out, *overrides))


def test_resume_after_a_crash_is_bit_identical(uninterrupted, llama_dir, chat_data, tmp_path,
                                               monkeypatch):
    overrides, straight_dir, straight = uninterrupted
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, at_step=3)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, chat_data, out, *overrides))
    assert not (out / "adapter").exists()
    resumed = loop.train(config(llama_dir, chat_data, out, *overrides, "train.resume=true"))

    expected, got = adapter_weights(straight_dir), adapter_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # The resumed run's log and figures read as the one uninterrupted run.
    assert comparable(read_metrics(out)) == comparable(read_metrics(straight_dir))
    for key in ("optimizer_steps", "train_tokens", "train_flops", "eval_flops", "eval_loss",
                "eval_history", "final_train_loss", "padding_fraction", "ff_stages",
                "ff_accepted_per_stage", "ff_flops"):
        assert resumed[key] == straight[key], key


def test_accelerate_state_checkpoints_resume_bit_identical(uninterrupted, llama_dir, chat_data,
                                                          tmp_path, monkeypatch):
    """checkpoint.format=accelerate (what FSDP and DeepSpeed use): model, optimizer and RNG
    through Accelerator.save_state/load_state, the adapter gathered beside them. Killed
    after step 3 and resumed, it ends bit-identical to the uninterrupted run saved the
    other way, and its step-3 adapter equals that run's."""
    overrides, straight_dir, _ = uninterrupted
    out = tmp_path / "run"
    fmt = "checkpoint.format=accelerate"
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, at_step=3)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, chat_data, out, *overrides, fmt))
    step3 = out / "checkpoints" / "step-3"
    assert {p.name for p in (step3 / "accelerate").iterdir()} >= {
        "model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert not (step3 / "optimizer.pt").exists()
    theirs = load_file(straight_dir / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors")
    ours = load_file(step3 / "adapter" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)

    loop.train(config(llama_dir, chat_data, out, *overrides, fmt, "train.resume=true"))
    expected, got = adapter_weights(straight_dir), adapter_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_before_any_checkpoint_starts_over(uninterrupted, llama_dir, chat_data,
                                                  tmp_path, monkeypatch):
    """A crash before the first checkpoint: resume starts from scratch, and the earlier
    partial log is not kept beside the new one."""
    overrides, straight_dir, _ = uninterrupted
    out = tmp_path / "run"
    real_step = loop.train_step
    calls = []

    def step_then_crash(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Crash("killed during step 2")
        return real_step(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", step_then_crash)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, chat_data, out, *overrides))
    assert not (out / "checkpoints").exists() and (out / "metrics.jsonl").exists()
    loop.train(config(llama_dir, chat_data, out, *overrides, "train.resume=true"))

    expected, got = adapter_weights(straight_dir), adapter_weights(out)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert comparable(read_metrics(out)) == comparable(read_metrics(straight_dir))


def test_existing_run_without_resume_is_refused(uninterrupted, llama_dir, chat_data):
    overrides, straight_dir, _ = uninterrupted
    log = (straight_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="train.resume=true"):
        loop.train(config(llama_dir, chat_data, straight_dir, *overrides))
    assert (straight_dir / "metrics.jsonl").read_text() == log  # nothing touched


@pytest.mark.parametrize("schedule", ["wsd", "infinite"])
def test_logged_lr_follows_the_configured_schedule(schedule, llama_dir, chat_data, tmp_path):
    from leantune.train.schedule import Schedule

    overrides = ["train.max_steps=10", "optim.lr=1e-3", f"schedule.kind={schedule}",
                 "schedule.warmup_steps=2", "schedule.decay_ratio=0.3",
                 "schedule.cooldown_ratio=0.3", "schedule.const_lr_ratio=0.5",
                 "schedule.min_lr_ratio=0.1", "eval.before=false"]
    summary = loop.train(config(llama_dir, chat_data, tmp_path / "run", *overrides))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    # W = 2, D = round(0.3 * 10) = 3, C = 3, worked out apart from the config plumbing.
    want = Schedule(schedule, 10, 2, 0.1, decay=3, const_ratio=0.5, cooldown=3)
    assert lrs == pytest.approx([1e-3 * want(s) for s in range(10)])
    assert len(set(round(x, 9) for x in lrs)) >= 4  # warmup, plateau/cooldown and decay seen
    assert summary["schedule"]["decay"] == 3 and summary["schedule"]["kind"] == schedule


def nan_on_step(monkeypatch, bad_step: int) -> None:
    """The training loss of optimizer step ``bad_step`` (one micro-batch a step) is NaN."""
    real, calls = loop.train_step, []

    def train_step(model, optimizer, micro, acc, max_grad_norm, objective):
        calls.append(1)
        return real(model, optimizer, micro, acc, max_grad_norm,
                    NanLoss() if len(calls) == bad_step else objective)

    monkeypatch.setattr(loop, "train_step", train_step)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
        llama_dir, chat_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_on_step(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at optimizer step 3 "
                                                 r"\(no update was made\); the last good "
                                                 r"checkpoint is .*step-2"):
        loop.train(config(llama_dir, chat_data, out, "train.max_steps=5", "checkpoint.every=2",
                          "eval.before=false"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert not (out / "adapter").exists()


def test_non_finite_steps_can_be_skipped_and_counted(llama_dir, chat_data, tmp_path,
                                                     monkeypatch):
    out = tmp_path / "run"
    nan_on_step(monkeypatch, 3)
    summary = loop.train(config(llama_dir, chat_data, out, "train.max_steps=5",
                                "checkpoint.every=1", "checkpoint.keep_last_n=5",
                                "train.on_nonfinite=skip", "eval.before=false"))
    assert summary["nonfinite_skipped"] == 1 and summary["nonfinite_steps"] == [3]
    assert summary["optimizer_steps"] == 5 and summary["eval_loss"]["after"] < 10
    two, three, four = (load_file(out / "checkpoints" / f"step-{k}" / "adapter" /
                                  "adapter_model.safetensors") for k in (2, 3, 4))
    assert all(torch.equal(two[k], three[k]) for k in two)  # step 3 changed nothing
    assert any(not torch.equal(three[k], four[k]) for k in three)  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in four.values())


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(
        llama_dir, chat_data, tmp_path, monkeypatch):
    import collections

    import leantune.train.run_dir as run_dir_mod

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match=r"0.00 GiB free, but its checkpoints and final weights"
                                          r" need about .*lower checkpoint.keep_last_n"):
        loop.train(config(llama_dir, chat_data, out, "train.max_steps=2"))
    assert not (out / "metrics.jsonl").exists()  # refused before any step or eval


def test_output_bytes_counts_kept_checkpoints_moments_and_the_final_copy():
    from leantune.train.run_dir import output_bytes

    # 1,000 fp32 weights: 4,000 bytes stored, 8,000 of AdamW moments per checkpoint.
    assert output_bytes(1000, 4000, keep_last_n=2, periodic=True) == 3 * 12_000 + 4000
    assert output_bytes(1000, 4000, keep_last_n=2, periodic=False) == 12_000 + 4000


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_no_partial_output(
        llama_dir, chat_data, tmp_path, monkeypatch):
    import errno

    import leantune.train.checkpoint as ckpt

    real, calls = ckpt.torch.save, []

    def save(obj, path, *args, **kwargs):  # the optimizer state of the 2nd checkpoint
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match=r"could not write checkpoint step-4 .*No space left on "
                                          r"device.*the last complete checkpoint is .*step-2"):
        loop.train(config(llama_dir, chat_data, out, "train.max_steps=6", "checkpoint.every=2",
                          "eval.before=false"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert not (out / "adapter").exists()


def test_the_final_adapter_is_whole_or_absent(llama_dir, chat_data, tmp_path, monkeypatch):
    import errno

    from leantune.adapters.lora import LoRA

    out = tmp_path / "run"

    def half_then_fail(self, model, directory, state_dict=None):
        directory.mkdir(parents=True)
        (directory / "adapter_config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    real = loop.save_output

    def save_output(*args):  # fail only for the final output
        with monkeypatch.context() as m:
            m.setattr(LoRA, "save", half_then_fail)
            return real(*args)

    monkeypatch.setattr(loop, "save_output", save_output)
    with pytest.raises(RunDirError, match=r"could not write .*adapter .*holds the same weights"):
        loop.train(config(llama_dir, chat_data, out, "train.max_steps=2", "eval.before=false"))
    assert not (out / "adapter").exists() and not list(out.glob(".tmp-*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


def test_a_model_that_cannot_generate_still_saves_its_run(llama_dir, chat_data, tmp_path,
                                                           monkeypatch, caplog):
    """Sample replies are a sample: a model whose generation fails (xLSTM's cache, say)
    gets none, with one log line, and the trained adapter and summary are written."""
    def fails(*args, **kwargs):
        raise ValueError("matC_old has wrong shape")

    monkeypatch.setattr(loop, "generate", fails)
    out = tmp_path / "run"
    summary = loop.train(config(llama_dir, chat_data, out, "train.max_steps=2",
                                "eval.generate=1"))
    assert "cannot generate (ValueError: matC_old has wrong shape)" in caplog.text
    assert summary["samples"] == [] and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 2
