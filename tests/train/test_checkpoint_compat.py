"""A checkpoint written before the package layout of issue 28 still resumes: a run killed
after its step-3 checkpoint by that code (``tests/fixtures/checkpoint_v0``, written by
``tests/fixtures/make_checkpoint_v0.py`` at commit 8e8a322) is resumed by today's code and
ends where an uninterrupted run of today's code, on the same base and data, ends."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.config import load_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_checkpoint_v0 import OVERRIDES  # noqa: E402


def test_a_checkpoint_of_the_old_layout_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # The old code drew LoRA's dropout masks with nn.Dropout; today's FastDropout draws
    # another random stream. Kept as it was, so the weights can match bit for bit and
    # the test judges the checkpoint layout alone.
    monkeypatch.setattr("leantune.adapters.lora.use_fast_dropout", lambda modules: 0)
    old = tmp_path / "v0"
    shutil.copytree(FIXTURES / "checkpoint_v0", old)
    assert sorted(p.name for p in (old / "run" / "checkpoints").iterdir()) == ["step-3"]
    common = [f"model.name_or_path={old / 'base'}", f"data.path={old / 'add.jsonl'}", *OVERRIDES]
    step3 = "checkpoints/step-3/adapter/adapter_model.safetensors"
    written_then = load_file(old / "run" / step3)
    resumed = loop.train(load_config(None, [*common, f"train.output_dir={old / 'run'}",
                                            "train.resume=true"]))
    straight = loop.train(load_config(None, [*common, f"train.output_dir={tmp_path / 'new'}"]))

    assert resumed["start"]["kind"] == "resume" and resumed["optimizer_steps"] == 6
    # Today's code takes the first three steps to the very weights the old code saved.
    same_steps = load_file(tmp_path / "new" / step3)
    assert all(torch.equal(written_then[k], same_steps[k]) for k in same_steps)
    theirs = load_file(old / "run" / "adapter" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "new" / "adapter" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and theirs
    for name in ours:
        assert torch.equal(theirs[name], ours[name]), name
    for key in ("train_tokens", "train_flops", "ff_accepted_per_stage", "padding_fraction"):
        assert resumed[key] == straight[key], key
    # The old run's log, cut back to its checkpoint, continues as one run.
    steps = [json.loads(line)["step"] for line in
             (old / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
