"""Runs killed with SIGKILL - inside an optimizer step, while a checkpoint is being written,
in the middle of a Fast Forward stage, at a random moment - and resumed end with adapter
weights bit-identical to an uninterrupted run's: data order, RNG, schedule, replay
position and FF state all come back. A checkpoint is complete or absent."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Started as `python -c WRAPPER where nth marker leantune-args...`: pauses (for SIGKILL) at
# the nth time the process reaches `where`, after writing `marker`.
WRAPPER = """
import pathlib, sys, time
where, nth, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
seen = []

def pause():
    seen.append(1)
    if len(seen) == nth:
        marker.write_text(where)
        time.sleep(600)

def before(module, name):
    real = getattr(module, name)
    setattr(module, name, lambda *a, **k: (pause(), real(*a, **k))[1])

if where == "step":
    import leantune.train.loop as m; before(m, "train_step")
elif where == "checkpoint":  # files written, nothing renamed into place yet
    import leantune.common.files as m; before(m.os, "fsync")
elif where == "fast_forward":  # an FF-set evaluation: a candidate is in the weights
    import leantune.train.build as m; before(m, "evaluate")
from leantune.cli import main
sys.exit(main(sys.argv[4:]))
"""


def leantune(args: list[str], where: str = "none", nth: int = 0, marker: Path | None = None
             ) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WRAPPER, where, str(nth),
                             str(marker or "/dev/null"), "train", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def kill_when(proc: subprocess.Popen, marker: Path | None, delay: float | None = None) -> None:
    """SIGKILL ``proc`` once ``marker`` exists (or after ``delay`` seconds)."""
    start = time.monotonic()
    while proc.poll() is None:
        if (marker is not None and marker.exists()) or (
                delay is not None and time.monotonic() - start > delay):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def complete_checkpoints(run_dir: Path) -> list[str]:
    """Every step-N directory must hold a whole checkpoint (temporary debris aside)."""
    root = run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) \
        if root.is_dir() else []
    for name in names:
        state = json.loads((root / name / "trainer_state.json").read_text())
        assert state["step"] == int(name.split("-")[1])
        assert (root / name / "optimizer.pt").is_file() and (root / name / "rng.pt").is_file()
    return names


@pytest.fixture(scope="module")
def task(llama_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """LoRA with dropout, 2 micro-batches a step, Fast Forward every 2 steps, a checkpoint
    every step (2 kept), on a corpus with 30 % replay; and the uninterrupted run."""
    root = tmp_path_factory.mktemp("kill")
    for name, words in (("new", "def add return a b numbers 0 1 2"), ("old", "the quick fox")):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(
            {"text": " ".join(words.split()[(i * k) % len(words.split())] for k in range(25))})
            + "\n" for i in range(40)))
    args = [f"model.name_or_path={llama_dir}", "data.mode=corpus", "data.max_length=32",
            f"data.path={root / 'new.jsonl'}", f"data.replay.path={root / 'old.jsonl'}",
            "data.replay.ratio=0.3", f"data.cache_dir={root / 'cache'}", "adapter.dropout=0.1",
            "optim.lr=1e-2", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=8",
            "train.progress=false", "checkpoint.every=1", "checkpoint.keep_last_n=2",
            "eval.every=3", "fast_forward.enabled=true", "fast_forward.interval=2",
            "fast_forward.eval_examples=2"]
    finish(leantune([*args, f"train.output_dir={root / 'straight'}"]))
    return args, root / "straight"


@pytest.mark.parametrize("where, nth", [("step", 4), ("checkpoint", 7), ("fast_forward", 5),
                                        ("random", 0)])
def test_killed_and_resumed_run_is_bit_identical(task, where, nth, tmp_path):
    args, straight = task
    out, marker = tmp_path / "run", tmp_path / "marker"
    run = [*args, f"train.output_dir={out}"]
    if where == "random":  # anywhere, start-up included; seeded so a failure replays
        kill_when(leantune(run), None, delay=random.Random(0).uniform(3, 12))
    else:
        kill_when(leantune(run, where, nth, marker), marker)
        assert marker.read_text() == where and not (out / "adapter").exists()
    on_disk = complete_checkpoints(out)
    if where == "step":  # killed before step 4's forward: steps 2 and 3 kept
        assert on_disk == ["step-2", "step-3"]
    if where == "checkpoint":  # mid-write: the next step's files sit under a temporary name
        tmp = [p.name for p in (out / "checkpoints").glob(".tmp-step-*")]
        assert tmp == [f".tmp-step-{int(on_disk[-1].split('-')[1]) + 1}"]
    finish(leantune([*run, "train.resume=true"]))
    expected, got = weights(straight), weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((straight / "summary.json").read_text())
    for key in ("replay", "ff_accepted_per_stage", "train_tokens", "eval_loss"):
        assert summary[key] == reference[key], key
    assert complete_checkpoints(out) == ["step-7", "step-8"]


def test_a_kill_during_the_first_checkpoint_leaves_none_and_resume_starts_over(task, tmp_path):
    """Killed while writing its very first checkpoint: no step-N directory exists (only a
    temporary one), and the resumed run starts from scratch to the same end."""
    args, straight = task
    out, marker = tmp_path / "run", tmp_path / "marker"
    run = [*args, f"train.output_dir={out}"]
    kill_when(leantune(run, "checkpoint", 1, marker), marker)
    assert complete_checkpoints(out) == []
    assert [p.name for p in (out / "checkpoints").iterdir()] == [".tmp-step-1"]
    finish(leantune([*run, "train.resume=true"]))
    expected, got = weights(straight), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the debris was cleared
