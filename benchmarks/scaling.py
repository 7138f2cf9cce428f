"""One process against two, on this machine's CPU processes: tokens/s and each process's
peak memory under DDP and FSDP2.

    python benchmarks/scaling.py [--rounds 2] [--steps 6] [--models 135m-lora,135m-full,360m-full]

Every arm is ``leantune train examples/quickstart.yaml`` (ShareGPT, 192-token rows) at
the same global batch of 4 rows, in a fresh launch, alternately over ``--rounds``
(the second round in reverse order), run alone:

- ``1 process``: ``leantune train``, the machine's threads (``OMP_NUM_THREADS`` = cores);
- ``2 DDP``: ``accelerate launch --multi_gpu --num_processes 2`` (gloo), 2 rows each,
  ``OMP_NUM_THREADS`` = cores / 2;
- ``2 FSDP2``: ``accelerate launch --config_file examples/accelerate/fsdp_cpu.yaml``,
  likewise.

Models: ``135m-lora`` (the quickstart as it ships: SmolLM2-135M-Instruct, LoRA r16),
``135m-full`` (full fine-tuning, where FSDP2 shards weights, gradients and AdamW's
moments) and ``360m-full`` (SmolLM2-360M's shapes with random weights, built from the
135M's tokenizer: the largest of the family whose DDP pair fits in this machine's
memory beside the FSDP2 one; no quality is measured on it). Figures come from each run's
``summary.json`` (``tokens_per_second``, ``peak_memory_bytes_per_process``); results
go to ``benchmarks/results/scaling.json``. On one machine, two processes share its
cores: the speed figures say what gloo's collectives cost, not what a second machine
would add.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scaling.json"
BIN = Path(sys.executable).parent
LAYOUTS = ("1 process", "2 DDP", "2 FSDP2")
# SmolLM2-360M's shapes (HuggingFaceTB/SmolLM2-360M-Instruct's config.json).
SHAPES_360M = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
               "num_attention_heads": 15, "num_key_value_heads": 5}


def model_360m(root: Path) -> str:
    """A random model of SmolLM2-360M's shapes with the embedded 135M's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leantune.config import ModelConfig
    from leantune.model.load import resolve_local

    source = Path(resolve_local(ModelConfig(name_or_path="embedded:smollm2")))
    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES_360M.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    target = root / "smollm2-360m-random"
    model.save_pretrained(target)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, target / f.name)
    return str(target)


def command(layout: str, port: int) -> tuple[list[str], dict]:
    cores = os.cpu_count() or 2
    if layout == "1 process":
        return [str(BIN / "leantune")], {"OMP_NUM_THREADS": str(cores)}
    how = (["--multi_gpu"] if layout == "2 DDP"
           else ["--config_file", str(REPO / "examples/accelerate/fsdp_cpu.yaml")])
    return ([str(BIN / "accelerate"), "launch", *how, "--num_processes", "2",
             "--main_process_port", str(port), str(BIN / "leantune")],
            {"OMP_NUM_THREADS": str(max(1, cores // 2))})


def run_arm(model: str, layout: str, steps: int, paths: dict, out: Path, port: int) -> dict:
    """One launch; its figures from ``summary.json``."""
    head, env = command(layout, port)
    per_process = 4 if layout == "1 process" else 2
    overrides = [f"train.max_steps={steps}", f"train.batch_size={per_process}",
                 "eval.generate=0", "data.eval_examples=8", "checkpoint.every=null",
                 "train.progress=false", f"train.output_dir={out}"]
    if model.endswith("full"):
        overrides += ["adapter.method=full", "optim.lr=2e-5"]
    if model.startswith("360m"):
        overrides.append(f"model.name_or_path={paths['360m']}")
    tick = time.time()
    done = subprocess.run([*head, "train", str(REPO / "examples/quickstart.yaml"), *overrides],
                          env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        return {"model": model, "layout": layout, "error": done.stderr[-2000:]}
    s = json.loads((out / "summary.json").read_text())
    peaks = s["peak_memory_bytes_per_process"]
    return {"model": model, "layout": layout, "processes": len(peaks),
            "tokens_per_second": s["tokens_per_second"], "train_seconds": s["train_seconds"],
            "wall_seconds": time.time() - tick, "precision": s["precision"]["used"],
            "strategy": s["strategy"]["type"], "peak_gib_per_process": [p / 2**30 for p in peaks],
            "peak_gib_total": sum(peaks) / 2**30, "eval_loss": s["eval_loss"]}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def table(arms: list[dict], models: list[str]) -> str:
    lines = ["| model | layout | precision | tokens/s (rounds) | median | x 1 process | "
             "peak GiB per process (max) | x 1 process | peak GiB, all processes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        rows = {lay: [a for a in arms if a["model"] == model and a["layout"] == lay
                      and "error" not in a] for lay in LAYOUTS}
        if not rows["1 process"]:
            continue
        base_speed = median([a["tokens_per_second"] for a in rows["1 process"]])
        base_mem = median([max(a["peak_gib_per_process"]) for a in rows["1 process"]])
        for lay, got in rows.items():
            if not got:
                lines.append(f"| {model} | {lay} | failed | - | - | - | - | - | - |")
                continue
            speeds = [a["tokens_per_second"] for a in got]
            speed, mem = median(speeds), median([max(a["peak_gib_per_process"]) for a in got])
            lines.append(
                f"| {model} | {lay} | {got[0]['precision']} | "
                f"{', '.join(f'{x:.1f}' for x in speeds)} | {speed:.1f} | "
                f"{speed / base_speed:.2f} | {mem:.2f} | {mem / base_mem:.2f} | "
                f"{median([a['peak_gib_total'] for a in got]):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default="135m-lora,135m-full,360m-full")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    from leantune.bench.all import machine

    models = args.models.split(",")
    arms = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {"360m": model_360m(root)} if any(m.startswith("360m") for m in models) else {}
        order = [(m, lay) for m in models for lay in LAYOUTS]
        for r in range(args.rounds):
            for i, (model, layout) in enumerate(order if r % 2 == 0 else order[::-1]):
                out = root / f"run-{r}-{i}"
                arm = run_arm(model, layout, args.steps, paths, out, 29590 + i)
                arm["round"] = r + 1
                print(json.dumps({k: v for k, v in arm.items() if k != "error"}), flush=True)
                if "error" in arm:
                    print(f"{model} / {layout} failed:\n{arm['error']}", file=sys.stderr)
                arms.append(arm)
                shutil.rmtree(out, ignore_errors=True)
    text = table(arms, models)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "steps": args.steps,
                                          "rounds": args.rounds, "arms": arms,
                                          "table": text}, indent=1))
    print(machine()["summary"])
    print(text)


if __name__ == "__main__":
    main()
