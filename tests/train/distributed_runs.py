"""Launching ``leantune train`` over several CPU processes (gloo) for the multi-process
tests, and reading what the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
FSDP_CPU = REPO / "examples" / "accelerate" / "fsdp_cpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launcher(kind: str, port: int, processes: int = 2, machines: int = 1,
             rank: int = 0) -> list[str]:
    """The command that starts ``leantune`` (``train`` and its overrides follow):
    ``one`` (this interpreter), ``torchrun``, ``ddp`` (``accelerate launch --multi_gpu``,
    which runs gloo data parallelism on CPU) or ``fsdp`` (``accelerate launch`` with
    ``examples/accelerate/fsdp_cpu.yaml``); ``machines`` > 1: this is node ``rank`` of a
    job on loopback, ``processes`` in all."""
    if kind == "one":
        return [sys.executable, "-m", "leantune"]
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port",
                str(port), "-m", "leantune"]
    how = ["--multi_gpu"] if kind == "ddp" else ["--config_file", str(FSDP_CPU)]
    nodes = (["--num_machines", str(machines), "--machine_rank", str(rank),
              "--main_process_ip", "127.0.0.1"] if machines > 1 else [])
    return [str(BIN / "accelerate"), "launch", *how, *nodes, "--num_processes",
            str(processes), "--main_process_port", str(port), str(BIN / "leantune")]


def train(head: list[str], overrides: list[str], run: Path, timeout: int = 300
          ) -> subprocess.CompletedProcess:
    """``head train *overrides train.output_dir=run``; asserts it succeeded."""
    done = subprocess.run([*head, "train", *overrides, f"train.output_dir={run}"], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_nodes(overrides: list[str], run: Path, kind: str, port: int, timeout: int = 300
                ) -> list[subprocess.CompletedProcess]:
    """Two ``accelerate launch`` invocations, one process each, as two machines of one
    job joined over loopback (``--num_machines 2 --machine_rank 0|1``)."""
    procs = [subprocess.Popen([*launcher(kind, port, 2, machines=2, rank=r), "train",
                               *overrides, f"train.output_dir={run}"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def step_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in step_records(run)]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's final adapter (or model) tensors."""
    for sub in ("adapter", "model"):
        files = sorted((run / sub).glob("*.safetensors"))
        if files:
            return {k: v for f in files for k, v in load_file(f).items()}
    raise FileNotFoundError(f"{run}: no adapter/ or model/ weights")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def chat_rows(path: Path, n: int = 40) -> Path:
    """``n`` chat rows "add a b" -> "The answer is a+b."."""
    path.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"add {i % 7} {i % 5}"},
                                 {"role": "assistant", "content": f"The answer is {i % 7 + i % 5}."}]})
        + "\n" for i in range(n)))
    return path


def pair_overrides(tmp_path: Path, kind: str) -> list[str]:
    """Preference pairs (the right sum chosen): a pair is never split across processes,
    and KTO's KL baseline is averaged over them."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(
        {"prompt": f"add {i % 7} {i % 5} =", "chosen": f" {i % 7 + i % 5}",
         "rejected": f" {i % 7 + i % 5 + 1 + i % 3}" + " maybe" * (i % 2)}) + "\n"
        for i in range(40)))
    return [f"data.path={path}", f"objective.kind={kind}"]


def corpus_overrides(tmp_path: Path) -> list[str]:
    """Two small raw-text corpora, the second replayed at a quarter of every step."""
    for name, words in (("new", "def add return a b numbers 0 1 2"), ("old", "the quick fox")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"text": " ".join(words.split()[(i + k) % len(words.split())] for k in range(25))})
            + "\n" for i in range(40)))
    return ["data.mode=corpus", f"data.path={tmp_path / 'new.jsonl'}", "data.max_length=32",
            f"data.replay.path={tmp_path / 'old.jsonl'}", "data.replay.ratio=0.25",
            f"data.cache_dir={tmp_path / 'cache'}"]


def grpo_overrides(tmp_path: Path) -> list[str]:
    """GRPO on ``add`` problems with a vowel-counting reward (no model is good at it)."""
    reward = tmp_path / "rewards.py"
    reward.write_text("def vowels(prompts, completions, **_):\n"
                      "    texts = [c[0]['content'] for c in completions]\n"
                      "    return [sum(ch in 'aeiou' for ch in t) / max(len(t), 1) "
                      "for t in texts]\n")
    return ["data.path=problems:add", "objective.kind=grpo", "objective.num_generations=3",
            "objective.max_completion_length=6", f"objective.rewards=[{reward}:vowels]",
            "objective.scale_rewards=batch", "data.max_length=96", "eval.generate=0"]
