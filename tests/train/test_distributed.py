"""Two processes (torchrun + Accelerate, gloo on CPU) with per-process batch b train
exactly like one process with batch 2b: same loss curve, same tokens, same eval, and
the same Fast Forward decisions (the FF-set loss is reduced over processes) - on
examples and on preference pairs with DPO, IPO, SimPO, ORPO and KTO (launched by
torchrun), and on corpus windows with replay (launched by ``accelerate launch``; the
shards built once, by rank 0). FSDP2's twins are in test_fsdp.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_runs import chat_rows, corpus_overrides, losses, pair_overrides, step_records
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PAIRS = ("dpo", "kto", "ipo", "simpo", "orpo")  # the preference objectives


@pytest.mark.parametrize("mode, port", [("examples", 29533), ("corpus", 29534),
                                        ("dpo", 29536), ("kto", 29537),
                                        ("ipo", 29564), ("simpo", 29565),
                                        ("orpo", 29566)])
def test_two_processes_match_one_with_twice_the_batch(mode, port, llama_dir, tmp_path):
    data = chat_rows(tmp_path / "chat.jsonl")
    # fp32: auto measures bf16 in each launch (the suite's in-process patch does not reach
    # subprocesses), and bf16 rounding moves one vs two processes apart by ~1e-4
    common = [f"model.name_or_path={llama_dir}", f"data.path={data}", "train.max_steps=4",
              "optim.lr=1e-2", "train.progress=false", "adapter.dropout=0.0",
              "train.precision=fp32",
              "data.eval_fraction=0.2", "train.grad_accum=2", "fast_forward.enabled=true",
              "fast_forward.interval=2", "fast_forward.eval_examples=4",
              # A margin keeps float rounding of the reduction from deciding a flat step.
              "fast_forward.min_improvement=1e-3",
              # The stage budget follows the step's FLOPs, which depend on how the rows are
              # laid out (2 x 2 rows per process vs 4 rows): unbounded, the decisions match.
              "fast_forward.max_cost=null"]
    common += corpus_overrides(tmp_path) if mode == "corpus" else []
    common += pair_overrides(tmp_path, mode) if mode in PAIRS else []
    leantune = [sys.executable, "-m", "leantune", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    if mode != "corpus":
        launch = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                  "-m", "leantune"]
    else:  # Accelerate's own launcher: --multi_gpu starts torchrun, which runs gloo on CPU
        launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", str(port), str(bin_dir / "leantune")]
    two = subprocess.run([*launch, "train", *common, "train.batch_size=2",
                          f"train.output_dir={tmp_path / 'two'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([*leantune, *common, "train.batch_size=4",
                          f"train.output_dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    assert step_records(tmp_path / "two")[-1]["tokens"] == step_records(tmp_path / "one")[-1]["tokens"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s2["ff_stages"] == s1["ff_stages"] == 2
    assert s2["ff_accepted_per_stage"] == s1["ff_accepted_per_stage"]
    if mode != "kto":  # KTO's held-out loss reads each eval batch's own KL estimate
        assert s2["eval_loss"]["after"] == pytest.approx(s1["eval_loss"]["after"], abs=1e-5)
    assert s2["train_tokens"] == s1["train_tokens"]
    assert two.stdout.count("run directory:") == 1  # only rank 0 prints and writes
    # The launch check's record: gloo data parallelism over the 2 processes asked for.
    assert s2["strategy"] == {"type": "MULTI_CPU", "processes": 2, "sharding": None,
                              "requested": {"type": None, "sharding": None, "processes": 2},
                              "warning": None}
    assert s1["strategy"] == {"type": "NO", "processes": 1, "sharding": None,
                              "requested": None, "warning": None}
    if mode in PAIRS:
        o2, o1 = s2["objective"], s1["objective"]
        for key, value in o1["held_out"]["after"].items():
            if mode != "kto" or key.startswith("logps"):
                assert o2["held_out"]["after"][key] == pytest.approx(value, abs=1e-5), key
        for key, value in o1["train"].items():
            assert o2["train"][key] == pytest.approx(value, abs=1e-5), key
    if mode == "corpus":
        assert s2["replay"]["windows"] == s1["replay"]["windows"] == {"data": 24, "replay": 8}
        assert s2["eval_sets"].keys() == s1["eval_sets"].keys() == {"new", "old"}
        for name in s1["eval_sets"]:
            assert s2["eval_sets"][name]["after"]["loss"] == pytest.approx(
                s1["eval_sets"][name]["after"]["loss"], abs=1e-5)
        assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize("before, after, steps, fmt", [(1, 2, 18, "leantune"),
                                                       (2, 1, 29, "leantune"),
                                                       (2, 2, 16, "accelerate")])
def test_resume_on_another_process_count(before, after, steps, fmt, llama_dir, tmp_path):
    """Two epochs of 32 examples, 2 per process per micro-batch, resumed after step 3 on
    another number of processes: the rest of the first epoch is re-batched, so every
    example is still trained on once per epoch (the same tokens as the run that never
    stopped), and the run ends when the data does:
    1 -> 2: 3 + ceil((1 - 3/32) * 16) = 18 steps; 2 -> 1: 3 + ceil((1 - 3/16) * 32) = 29.
    On the same 2 processes with checkpoints through Accelerator.save_state (each
    process's RNG saved), the resumed adapter is bit-identical to the uninterrupted one."""
    data = chat_rows(tmp_path / "chat.jsonl")
    common = [f"model.name_or_path={llama_dir}", f"data.path={data}", "train.epochs=2",
              "train.batch_size=2", "optim.lr=1e-2", "train.progress=false",
              "train.precision=fp32",
              "data.eval_fraction=0.2", "checkpoint.every=1", "checkpoint.keep_last_n=100",
              f"checkpoint.format={fmt}", "adapter.dropout=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent

    def launch(world: int, run: Path, *extra: str) -> subprocess.CompletedProcess:
        head = ([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", "29535"]
                if world == 2 else [sys.executable])
        done = subprocess.run([*head, "-m", "leantune", "train", *common,
                               f"train.output_dir={run}", *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    whole = tmp_path / "whole"
    launch(before, whole)
    # A run killed after step 3: its directory up to checkpoint 3 (a kill leaves no more).
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    for ckpt in (cut / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 3:
            shutil.rmtree(ckpt)
    resumed = launch(after, cut, "train.resume=true")
    assert (f"resume from {before} processes on {after}" in resumed.stderr) == (before != after)
    s_whole = json.loads((whole / "summary.json").read_text())
    s_cut = json.loads((cut / "summary.json").read_text())
    assert s_cut["optimizer_steps"] == steps
    assert s_cut["examples"] == s_whole["examples"] == 2 * 32
    assert s_cut["train_tokens"] == s_whole["train_tokens"]
    resumed = losses(cut)
    assert len(resumed) == steps and all(math.isfinite(x) for x in resumed)
    weights = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (whole, cut)]
    if before == after:
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_grpo_on_two_processes_matches_one_with_twice_the_prompts(llama_dir, tmp_path):
    """GRPO: each prompt samples from a generator seeded by its place in the global batch,
    so two processes with 2 prompts per micro-batch sample, score and train on what one
    process with 4 does: the same rewards, groups and completion tokens, the same loss
    (normalized over both processes' completion tokens) and held-out rewards."""
    reward = tmp_path / "rewards.py"
    reward.write_text("def vowels(prompts, completions, **_):\n"
                      "    texts = [c[0]['content'] for c in completions]\n"
                      "    return [sum(ch in 'aeiou' for ch in t) / max(len(t), 1) "
                      "for t in texts]\n")
    common = [f"model.name_or_path={llama_dir}", "data.path=problems:add", "train.max_steps=3",
              "objective.kind=grpo", "objective.num_generations=3",
              "objective.max_completion_length=6", f"objective.rewards=[{reward}:vowels]",
              "objective.scale_rewards=batch", "data.max_length=96", "data.eval_examples=8",
              "optim.lr=5e-3", "train.progress=false", "adapter.dropout=0.0",
              "train.precision=fp32", "train.grad_accum=2", "eval.generate=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    two = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port",
                          "29538", "-m", "leantune", "train", *common, "train.batch_size=2",
                          f"train.output_dir={tmp_path / 'two'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "leantune", "train", *common,
                          "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]

    def steps(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r]

    s2, s1 = steps("two"), steps("one")
    for a, b in zip(s2, s1, strict=True):
        assert (a["groups"], a["tied_groups"], a["rollout_tokens"]) == (
            b["groups"], b["tied_groups"], b["rollout_tokens"])
        for key in ("loss", "reward", "reward_std", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    g2, g1 = (json.loads((tmp_path / run / "summary.json").read_text())["grpo"]
              for run in ("two", "one"))
    assert g2["held_out"]["after"] == pytest.approx(g1["held_out"]["after"], abs=1e-6)
