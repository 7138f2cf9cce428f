"""TensorBoard (and W&B) through Accelerate's trackers: the scalars TensorBoard holds are
the lines of ``metrics.jsonl``, also across a crash and resume; a tracker asked for but
not installed is a one-line error before training."""

from __future__ import annotations

import importlib.util
import json

import pytest

import leantune.train.loop as loop
from leantune.cli import main
from leantune.train.trackers import hyperparameters, scalars
from train.test_loop import config

from conftest import Crash
from helpers import write_rows

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SETTINGS = ["train.max_steps=6", "eval.every=2", "train.log_every=1", "optim.lr=5e-3",
            "logging.tensorboard=true", "checkpoint.every=3", "fast_forward.enabled=true",
            "fast_forward.interval=2", "fast_forward.eval_examples=4"]


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard" / "leantune"),
                                             size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl holds, read independently of `scalars`."""
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval_sets" in r:
            for name, v in r["eval_sets"].items():
                out.setdefault(f"eval/{name}/loss", []).append((r["step"], v["loss"]))
        elif r.get("tag") == "fast_forward":
            out.setdefault("fast_forward/accepted", []).append((r["step"], r["ff_accepted"]))
        else:
            out.setdefault("train/loss", []).append((r["step"], r["loss"]))
            out.setdefault("train/lr", []).append((r["step"], r["lr"]))
    return out


def assert_same(tb: dict, log: dict) -> None:
    for tag, points in log.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("tb") / "add.jsonl", 0, 48)


def test_tensorboard_holds_the_metrics_lines(llama_dir, data, tmp_path):
    loop.train(config(llama_dir, data, tmp_path / "run", *SETTINGS))
    tb, log = tensorboard_scalars(tmp_path / "run"), logged(tmp_path / "run")
    assert len(log["train/loss"]) == 6 and len(log["eval/add/loss"]) == 4
    assert_same(tb, log)
    assert {"train/tokens_per_second", "train/peak_memory_bytes", "train/padding_fraction",
            "eval/add/perplexity", "fast_forward/loss_after"} <= tb.keys()


def test_resumed_run_reads_as_one_run_in_tensorboard(llama_dir, data, tmp_path, monkeypatch):
    """Crashed after logging step 5 (checkpoint: step 3), then resumed from step 3: steps 4
    and 5 are logged again, and TensorBoard holds each step once, with the values of the
    uninterrupted run."""
    straight = tmp_path / "straight"
    loop.train(config(llama_dir, data, straight, *SETTINGS))
    out = tmp_path / "resumed"
    real = loop.log_step

    def log_then_crash(run, *args):
        real(run, *args)
        if run.state.step == 5:
            raise Crash("killed after logging step 5")

    with monkeypatch.context() as m:
        m.setattr(loop, "log_step", log_then_crash)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, data, out, *SETTINGS))
    assert [s for s, _ in tensorboard_scalars(out)["train/loss"]] == [1, 2, 3, 4, 5]
    loop.train(config(llama_dir, data, out, *SETTINGS, "train.resume=true"))
    assert_same(tensorboard_scalars(out), logged(straight))


def test_scalars_and_hyperparameters():
    assert scalars({"step": 3, "loss": 1.5, "lr": 1e-3, "grad_norm": None, "nan": float("nan"),
                    "flag": True}) == {"train/loss": 1.5, "train/lr": 1e-3}
    assert scalars({"step": 2, "tag": "periodic", "eval_loss": 2.0, "eval_sets": {
        "a": {"loss": 2.0, "perplexity": 7.4, "target_tokens": 9}}}) == {
        "eval/a/loss": 2.0, "eval/a/perplexity": 7.4}
    assert scalars({"step": 6, "tag": "fast_forward", "ff_accepted": 4}) == {
        "fast_forward/accepted": 4.0}
    assert hyperparameters({"a": {"b": [1, 2], "c": None, "d": 0.5}}) == {
        "a.b": "[1, 2]", "a.c": "None", "a.d": 0.5}


@pytest.mark.parametrize("flag,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_not_installed_is_a_one_line_error(llama_dir, data, tmp_path, capsys,
                                                     monkeypatch, flag, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX", "wandb")
                        else real(name, *a))
    code = main(["train", f"model.name_or_path={llama_dir}", f"data.path={data}",
                 f"train.output_dir={tmp_path / 'run'}", f"logging.{flag}=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"logging.{flag}=true needs the {package} package" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_wandb_offline_run_beside_the_run(llama_dir, data, tmp_path, monkeypatch):
    """W&B (when installed; not in the test extra) through the same tracker calls, kept
    local with WANDB_MODE=offline: its run lands in RUN_DIR/wandb, named after the run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb-run"
    loop.train(config(llama_dir, data, out, "train.max_steps=3", "logging.wandb=true"))
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 1000
    debug = (runs[0].parent / "logs" / "debug.log").read_text()
    assert "wb-run" in debug and (out / "metrics.jsonl").is_file()
