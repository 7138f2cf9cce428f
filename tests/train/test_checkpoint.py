"""Checkpoints are complete or absent, pruned to the newest ``keep_last_n``, and restore
adapter weights, optimizer state and every RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import leantune.train.checkpoint as ckpt
from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.train.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from leantune.train.run_dir import RunDirError

FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt",
         "rng.pt", "trainer_state.json"]


@pytest.fixture
def run(llama_dir):
    """(adapter, model, optimizer) after one AdamW step, so the optimizer has state."""
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(r=4, dropout=0.0))
    model = adapter.apply(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt)
    return adapter, model, opt


def step(model, opt) -> None:
    ids = torch.randint(5, model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad()


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_save_writes_a_complete_step_dir_and_no_temp(run, tmp_path):
    adapter, model, opt = run
    path = save_checkpoint(tmp_path, 3, adapter, model, opt, {"epoch": 1}, keep_last_n=2)
    assert path == tmp_path / "checkpoints" / "step-3"
    assert names(tmp_path) == ["step-3"]
    for f in FILES:
        assert (path / f).is_file() and (path / f).stat().st_size > 0, f
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["epoch"] == 1
    assert latest_checkpoint(tmp_path) == path


def test_keep_last_n_keeps_the_newest_by_step_number(run, tmp_path):
    adapter, model, opt = run
    for s in (8, 9, 10, 11):  # 10 and 11 sort before 8 and 9 as strings
        save_checkpoint(tmp_path, s, adapter, model, opt, {}, keep_last_n=2)
    assert names(tmp_path) == ["step-10", "step-11"]
    assert latest_checkpoint(tmp_path).name == "step-11"
    save_checkpoint(tmp_path, 12, adapter, model, opt, {}, keep_last_n=1)
    assert names(tmp_path) == ["step-12"]


def test_resaving_a_step_replaces_it(run, tmp_path):
    adapter, model, opt = run
    save_checkpoint(tmp_path, 5, adapter, model, opt, {"epoch": 0}, keep_last_n=2)
    save_checkpoint(tmp_path, 5, adapter, model, opt, {"epoch": 1}, keep_last_n=2)
    assert names(tmp_path) == ["step-5"]
    assert json.loads((tmp_path / "checkpoints/step-5/trainer_state.json").read_text())[
        "epoch"] == 1


def test_leftover_temp_dir_is_ignored_then_cleaned(run, tmp_path):
    adapter, model, opt = run
    save_checkpoint(tmp_path, 5, adapter, model, opt, {}, keep_last_n=3)
    debris = tmp_path / "checkpoints" / ".tmp-step-7"  # a crash while writing step 7
    (debris / "adapter").mkdir(parents=True)
    (debris / "optimizer.pt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step-5"
    assert [p.name for p in checkpoints(tmp_path)] == ["step-5"]
    save_checkpoint(tmp_path, 6, adapter, model, opt, {}, keep_last_n=3)
    assert names(tmp_path) == ["step-5", "step-6"]


def test_crash_mid_write_leaves_the_previous_checkpoint_latest(run, tmp_path, monkeypatch):
    adapter, model, opt = run
    save_checkpoint(tmp_path, 2, adapter, model, opt, {}, keep_last_n=2)

    def disk_full(obj, path):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(RunDirError, match=r"could not write checkpoint step-4 .*No space left on "
                                          r"device.*the last complete checkpoint is .*step-2"):
        save_checkpoint(tmp_path, 4, adapter, model, opt, {}, keep_last_n=2)
    assert not (tmp_path / "checkpoints" / "step-4").exists()
    assert not (tmp_path / "checkpoints" / ".tmp-step-4").exists()  # the partial copy is gone
    assert latest_checkpoint(tmp_path).name == "step-2"


def test_load_restores_weights_optimizer_and_rngs(run, tmp_path):
    adapter, model, opt = run
    path = save_checkpoint(tmp_path, 1, adapter, model, opt, {"epoch": 2, "batch_in_epoch": 7},
                           keep_last_n=2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = opt.state_dict()
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt_state["state"].items()}
    draws = (torch.rand(5), random.random(), np.random.rand(3), torch.randn(2))

    step(model, opt)  # move weights, optimizer and all three RNGs on
    random.random()
    np.random.rand(2)
    state = load_checkpoint(path, adapter, model, opt)

    assert state == {"epoch": 2, "batch_in_epoch": 7, "step": 1}
    assert torch.equal(torch.rand(5), draws[0])
    assert random.random() == draws[1]
    assert np.array_equal(np.random.rand(3), draws[2])
    assert torch.equal(torch.randn(2), draws[3])
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[n]), n
    restored = opt.state_dict()["state"]
    assert restored.keys() == opt_state.keys()
    for k, v in opt_state.items():
        for kk, vv in v.items():
            assert torch.equal(restored[k][kk], vv), (k, kk)


def test_restored_run_continues_exactly(run, tmp_path):
    """One more step after load equals the step an uninterrupted run took."""
    adapter, model, opt = run
    path = save_checkpoint(tmp_path, 1, adapter, model, opt, {}, keep_last_n=2)
    step(model, opt)  # draws its batch from the torch RNG saved in the checkpoint
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step(model, opt)
    load_checkpoint(path, adapter, model, opt)
    step(model, opt)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[n]), n
