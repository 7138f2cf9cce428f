"""FSDP2 over CPU processes (gloo), launched as users launch it (``accelerate launch
--config_file examples/accelerate/fsdp_cpu.yaml``): two sharded processes with batch b
train exactly like one process with batch 2b, for full fine-tuning and LoRA, with Fast
Forward, and for every objective; checkpoints are written sharded, resume on the same,
another or no sharding, and two machines joined over loopback equal one process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from distributed_runs import (
    BIN,
    ENV,
    REPO,
    chat_rows,
    corpus_overrides,
    grpo_overrides,
    launcher,
    losses,
    max_difference,
    pair_overrides,
    step_records,
    summary,
    train,
    train_nodes,
    weights,
)

pytestmark = pytest.mark.slow

FSDP2 = {"type": "FSDP", "processes": 2, "sharding": "FSDP2 reshard_after_forward=True",
         "requested": {"type": "FSDP", "sharding": "FSDP2 reshard_after_forward=True",
                       "processes": 2}, "warning": None}


def common(llama_dir: str, data: Path) -> list[str]:
    # fp32: auto measures bf16 in each launch, and bf16 rounding moves one vs two
    # processes apart by ~1e-4
    return [f"model.name_or_path={llama_dir}", f"data.path={data}", "train.max_steps=4",
            "optim.lr=1e-2", "train.progress=false", "adapter.dropout=0.0",
            "train.precision=fp32", "data.eval_fraction=0.2", "eval.generate=0"]


FAST_FORWARD = ["train.grad_accum=2", "fast_forward.enabled=true", "fast_forward.interval=2",
                "fast_forward.eval_examples=4", "fast_forward.min_improvement=1e-3",
                "fast_forward.max_cost=null"]


@pytest.mark.parametrize("method, lr, port", [("lora", 1e-2, 29541), ("full", 1e-3, 29542)])
def test_two_sharded_processes_match_one_with_twice_the_batch(method, lr, port, llama_dir,
                                                              tmp_path):
    """Losses, Fast Forward's decisions, held-out loss and the final weights; the first
    step's gradient norm too (the packing probe's gradients once leaked into it)."""
    overrides = [*common(llama_dir, chat_rows(tmp_path / "chat.jsonl")), *FAST_FORWARD,
                 f"adapter.method={method}", f"optim.lr={lr}"]
    two = train(launcher("fsdp", port), [*overrides, "train.batch_size=2"], tmp_path / "two")
    train(launcher("one", port), [*overrides, "train.batch_size=4"], tmp_path / "one")
    s2, s1 = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert s2["strategy"] == FSDP2
    assert len(s2["peak_memory_bytes_per_process"]) == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    g2, g1 = (step_records(tmp_path / run)[0]["grad_norm"] for run in ("two", "one"))
    assert g2 == pytest.approx(g1, rel=1e-5)
    assert s2["ff_stages"] == s1["ff_stages"] == 2
    assert s2["ff_accepted_per_stage"] == s1["ff_accepted_per_stage"]
    assert sum(s1["ff_accepted_per_stage"]) > 0  # Fast Forward moved the weights
    assert s2["eval_loss"]["after"] == pytest.approx(s1["eval_loss"]["after"], abs=1e-5)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-4
    # checkpoint.format=auto under FSDP2: each process's shard (DCP), and the gathered
    # adapter (or model) beside it, usable alone
    ckpt = tmp_path / "two" / "checkpoints" / "step-4"
    assert len(list((ckpt / "accelerate" / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((ckpt / "accelerate" / "optimizer_0").glob("*.distcp"))) == 2
    assert (ckpt / ("model" if method == "full" else "adapter")).is_dir()
    assert two.stdout.count("run directory:") == 1  # only rank 0 prints and writes


@pytest.mark.parametrize("overrides, port", [
    (["adapter.method=loreft", "optim.lr=1e-3"], 29557),
    (["adapter.use_dora=true", "optim.lr=1e-3"], 29558),
    (["adapter.method=ia3", "optim.lr=1e-2"], 29559)], ids=["loreft", "dora", "ia3"])
def test_adapters_under_fsdp2_match_one_process(overrides, port, llama_dir, tmp_path):
    """ReFT's interventions (leantune's own module), DoRA's magnitudes, IA3's scales."""
    overrides = [*common(llama_dir, chat_rows(tmp_path / "chat.jsonl")), *overrides]
    train(launcher("fsdp", port), [*overrides, "train.batch_size=2"], tmp_path / "two")
    train(launcher("one", port), [*overrides, "train.batch_size=4"], tmp_path / "one")
    assert summary(tmp_path / "two")["strategy"] == FSDP2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5


def test_prompt_tuning_is_refused_under_fsdp2(llama_dir, tmp_path):
    overrides = [*common(llama_dir, chat_rows(tmp_path / "chat.jsonl")),
                 "adapter.method=prompt_tuning", f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run([*launcher("fsdp", 29560), "train", *overrides], env=ENV,
                          capture_output=True, text=True, timeout=240)
    errors = {line for line in done.stderr.splitlines() if line.startswith("leantune: error:")}
    assert errors == {"leantune: error: adapter.method=prompt_tuning cannot train under FSDP: "
                      "PEFT looks its virtual tokens up outside the model's forward, where "
                      "FSDP2 holds them as shards; its table is small enough for every "
                      "process to hold, so launch with DDP instead (accelerate launch "
                      "--multi_gpu --num_processes N)"}, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective, port", [("corpus", 29543), ("dpo", 29544),
                                             ("dpo-full", 29545), ("kto", 29546),
                                             ("simpo", 29561), ("orpo", 29562),
                                             ("grpo", 29547)])
def test_objectives_under_fsdp2_match_one_process(objective, port, llama_dir, tmp_path):
    """Continual pre-training with replay (windows built once, by rank 0), DPO with the
    adapter switched off as reference and with a sharded copy of the full model, KTO,
    SimPO and ORPO (no reference), and GRPO with a held-out split of 65 prompts (33 and
    32 per process: every process must sample as many batches, or FSDP's collectives fall
    out of step)."""
    overrides = common(llama_dir, chat_rows(tmp_path / "chat.jsonl"))
    if objective == "corpus":
        overrides += corpus_overrides(tmp_path)
    elif objective == "grpo":
        overrides += [*grpo_overrides(tmp_path), "train.max_steps=2", "train.grad_accum=2",
                      "data.eval_fraction=0.65", "optim.lr=5e-3"]
    else:
        overrides += pair_overrides(tmp_path, objective.removesuffix("-full"))
        overrides += ["adapter.method=full", "optim.lr=1e-3"] if objective == "dpo-full" else []
    train(launcher("fsdp", port), [*overrides, "train.batch_size=2"], tmp_path / "two")
    train(launcher("one", port), [*overrides, "train.batch_size=4"], tmp_path / "one")
    s2, s1 = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert s2["strategy"] == FSDP2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-4
    if objective == "grpo":
        for a, b in zip(step_records(tmp_path / "two"), step_records(tmp_path / "one"),
                        strict=True):
            assert a["rollout_tokens"] == b["rollout_tokens"]
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert s2["grpo"]["held_out"]["after"] == pytest.approx(
            s1["grpo"]["held_out"]["after"], abs=1e-6)
    elif objective != "kto":  # KTO's held-out loss reads each eval batch's own KL estimate
        assert s2["eval_loss"]["after"] == pytest.approx(s1["eval_loss"]["after"], abs=1e-5)
    if objective == "corpus":
        assert s2["replay"]["windows"] == s1["replay"]["windows"] == {"data": 12, "replay": 4}


RESUME = ["train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last_n=100"]


def cut_after(run: Path, into: Path, step: int) -> Path:
    """A copy of ``run`` as a kill after checkpoint ``step`` leaves it."""
    import shutil

    shutil.copytree(run, into)
    for leftover in ("adapter", "model"):
        shutil.rmtree(into / leftover, ignore_errors=True)
    (into / "summary.json").unlink()
    for ckpt in (into / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return into


@pytest.fixture(scope="module")
def sharded_run(llama_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """An FSDP2 run of 8 steps on 2 processes, checkpointed (sharded) after each."""
    tmp = tmp_path_factory.mktemp("sharded")
    overrides = [*common(llama_dir, chat_rows(tmp / "chat.jsonl")), *RESUME,
                 "train.batch_size=2"]
    train(launcher("fsdp", 29548), overrides, tmp / "whole")
    return tmp / "whole", overrides


@pytest.mark.parametrize("kind, processes, rows, port", [
    ("fsdp", 2, 2, 29549), ("ddp", 2, 2, 29550), ("one", 1, 4, 29552), ("fsdp", 3, 2, 29551)])
def test_sharded_checkpoint_resumes_anywhere(kind, processes, rows, port, sharded_run,
                                             tmp_path):
    """Killed after step 3, resumed: on the same 2 FSDP2 processes the run ends
    bit-identical; on 2 DDP processes, or on 1 process of 4 rows (the same global batch:
    the data plan goes on unchanged), the shards are read whole and the run ends as the
    one that never stopped; on 3 FSDP2 processes (DCP re-shards) the global batch
    changes, so the run is checked to go on from the checkpoint's exact weights: at an LR
    of 1e-30 nothing moves them."""
    whole, overrides = sharded_run
    cut = cut_after(whole, tmp_path / "cut", 3)
    same_batch = processes * rows == 4
    extra = ["train.resume=true", f"train.batch_size={rows}"]
    extra += [] if same_batch else ["optim.lr=1e-30"]
    done = train(launcher(kind, port, processes), [*overrides, *extra], cut)
    assert summary(cut)["optimizer_steps"] == 8
    if same_batch:
        assert losses(cut) == pytest.approx(losses(whole), abs=1e-6)
        limit = 0.0 if kind == "fsdp" else 1e-6
        assert max_difference(weights(cut), weights(whole)) <= limit
        assert "re-batched" not in done.stderr
    else:
        saved = weights(cut / "checkpoints" / "step-3")
        assert max_difference(weights(cut), saved) < 1e-7
        assert max_difference(saved, weights(whole)) > 1e-3  # the check can fail
        assert "resume from 2 processes on 3, 2 rows each (was 2)" in done.stderr
    if kind != "fsdp":
        assert "was written sharded (FSDP2) and is read unsharded" in done.stderr


def test_whole_checkpoint_resumes_sharded(llama_dir, tmp_path):
    """Full fine-tuning on 2 DDP processes (checkpoints whole: model/, optimizer.pt),
    killed after step 3 and resumed on 2 FSDP2 processes: the whole weights and AdamW
    moments are cut into shards, and the run ends as the one that never stopped."""
    overrides = [*common(llama_dir, chat_rows(tmp_path / "chat.jsonl")), *RESUME,
                 "train.batch_size=2", "adapter.method=full", "optim.lr=1e-3"]
    train(launcher("ddp", 29553), overrides, tmp_path / "whole")
    cut = cut_after(tmp_path / "whole", tmp_path / "cut", 3)
    assert (cut / "checkpoints" / "step-3" / "optimizer.pt").is_file()
    train(launcher("fsdp", 29554), [*overrides, "train.resume=true"], cut)
    assert summary(cut)["strategy"] == FSDP2
    assert losses(cut) == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    assert max_difference(weights(cut), weights(tmp_path / "whole")) < 1e-6


@pytest.mark.parametrize("kind, port", [("ddp", 29555), ("fsdp", 29556)])
def test_two_machines_on_loopback_match_one_process(kind, port, llama_dir, tmp_path):
    """``accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip
    127.0.0.1``, one process each (what a cluster runs, one node per machine)."""
    overrides = common(llama_dir, chat_rows(tmp_path / "chat.jsonl"))
    nodes = train_nodes([*overrides, "train.batch_size=2"], tmp_path / "two", kind, port)
    train(launcher("one", port), [*overrides, "train.batch_size=4"], tmp_path / "one")
    s2 = summary(tmp_path / "two")
    assert s2["strategy"]["processes"] == 2
    assert s2["strategy"]["type"] == ("FSDP" if kind == "fsdp" else "MULTI_CPU")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5
    assert [n.stdout.count("run directory:") for n in nodes] == [1, 0]  # global rank 0


def test_slurm_example_on_loopback(llama_dir, tmp_path):
    """``examples/slurm/train.sbatch`` as SLURM would run it on 2 nodes, with ``srun``
    and ``scontrol`` standing in (both "nodes" here, one CPU process each, FSDP2):
    the same run as one process with the global batch."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (fake / "srun").write_text(  # every node runs the command with its SLURM_NODEID
        "#!/bin/bash\nshift  # --kill-on-bad-exit=1\n"
        "SLURM_NODEID=0 \"$@\" & a=$!\nSLURM_NODEID=1 \"$@\" & b=$!\n"
        "wait $a && wait $b\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    overrides = common(llama_dir, chat_rows(tmp_path / "chat.jsonl"))
    env = {**ENV, "PATH": f"{fake}:{BIN}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1",
           "ACCELERATE_CONFIG": "examples/accelerate/fsdp_cpu.yaml", "MAIN_PORT": "29563"}
    done = subprocess.run(["bash", "examples/slurm/train.sbatch", *overrides,
                           "train.batch_size=2", f"train.output_dir={tmp_path / 'two'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(launcher("one", 0), [*overrides, "train.batch_size=4"], tmp_path / "one")
    s2 = summary(tmp_path / "two")
    assert s2["strategy"]["type"] == "FSDP" and s2["strategy"]["processes"] == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5
