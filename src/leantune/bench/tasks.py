"""``leantune bench tasks``: every adapter method trained on real tasks and scored by
multiple-choice accuracy, as the LoReFT paper compares them (its Table 2, commonsense).

Each method trains with ``leantune train`` in its own process on the same rows (the
training splits of ``tasks`` interleaved, ``examples`` of them), the same batches and
optimizer steps, and is scored on the same ``eval_docs`` validation documents of each task
(a fixed seeded subset): ``acc`` / ``acc_norm`` with 95 % intervals and the macro average.
The base model's accuracy is the LoRA run's "before" (LoRA starts as the base exactly).

Settings follow the paper where it gives them (LoReFT / DiReFT: every layer, r = 8, f7+l7,
tied, lr 9e-4, dropout 0; linear decay after 10 % warmup for every method); each other
method trains at its default LR (``optim.lr: null``). ``lora_r8_lr1e-3`` (LoRA r8 at 1e-3)
is there to ask for: a method comparison at one untuned LR says little. Seeds
``42 .. 42 + seeds - 1`` for every method (data order, split and init), in alternating
order, so each method's two seeds bracket the noise; the table gives each seed's macro
accuracy and their mean.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from leantune.bench.common import cpu_info

REFT = ["adapter.r=8", "adapter.layers=all", "adapter.positions=f7+l7", "adapter.tied=true",
        "adapter.dropout=0.0", "optim.lr=9e-4"]
VARIANTS = {"lora_r8": ["adapter.method=lora", "adapter.r=8", "adapter.alpha=16"],
            "lora_r8_lr1e-3": ["adapter.method=lora", "adapter.r=8", "adapter.alpha=16",
                               "optim.lr=1e-3"],
            "dora_r8": ["adapter.method=lora", "adapter.use_dora=true", "adapter.r=8",
                        "adapter.alpha=16"],
            "ia3": ["adapter.method=ia3"],
            "prompt_tuning": ["adapter.method=prompt_tuning"],
            "loreft": ["adapter.method=loreft", *REFT],
            "direft": ["adapter.method=direft", *REFT],
            "full": ["adapter.method=full"]}
DEFAULT_TASKS = "arc_easy,piqa,socialiqa,boolq"
DEFAULT_VARIANTS = ("lora_r8", "dora_r8", "ia3", "prompt_tuning", "loreft", "direft", "full")
KEPT = ("trainable_params", "total_params", "tokens_per_second", "train_seconds",
        "train_flops", "eval_flops", "optimizer_steps", "train_tokens", "packing")


def task_overrides(model: str, tasks: str, examples: int, eval_docs: int, batch_size: int,
                   max_length: int, steps: int) -> list[str]:
    """The shared setup: everything but the method."""
    return [f"model.name_or_path={model}", f"data.path=task:{tasks}",
            f"data.max_examples={examples}", f"data.max_length={max_length}",
            "data.eval_examples=32", f"eval.tasks={tasks}", f"eval.task_examples={eval_docs}",
            "eval.batch_size=16", "eval.generate=0", f"train.batch_size={batch_size}",
            f"train.max_steps={steps}", "train.progress=false", "schedule.kind=linear",
            "schedule.warmup_ratio=0.1", "optim.lr=null", "checkpoint.every=null"]


def split_variants(text: str) -> list[str]:
    """``--variants``' comma-separated names, a comma inside brackets kept (a list value:
    ``loreft@adapter.layers=[0,10,20]``)."""
    return [v for v in re.split(r",(?![^\[]*\])", text) if v]


def variant_overrides(variant: str) -> list[str]:
    """A named variant's overrides, then those after each ``@``: ``loreft@optim.lr=3e-3``
    is LoReFT at 3e-3, ``loreft@adapter.r=16@optim.lr=2e-3`` changes two settings (a
    sweep, in one command)."""
    name, *extra = variant.split("@")
    if name not in VARIANTS or any("=" not in e for e in extra):
        raise ValueError(f"unknown variant {variant!r}: one of {list(VARIANTS)}, optionally "
                         "followed by @SECTION.KEY=VALUE overrides")
    return [*VARIANTS[name], *extra]


def run_variant(variant: str, setup: list[str], work: Path, seed: int, before: bool) -> dict:
    """Train one variant in a fresh process; its figures and task accuracy."""
    out = work / f"run{len(list(work.iterdir()))}-{seed}"
    cmd = [sys.executable, "-m", "leantune", "train", *setup, *variant_overrides(variant),
           f"eval.before={str(before).lower()}", f"train.output_dir={out}",
           f"train.seed={seed}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    lr = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]
    return {k: summary[k] for k in KEPT} | {
        "seed": seed, "lr": lr, "eval_loss_after": summary["eval_loss"]["after"],
        "accuracy": summary["task_accuracy"], "curve": summary.get("task_curve")}


def bench_tasks(model: str = "embedded:smollm2", tasks: str = DEFAULT_TASKS,
                variants: list[str] = DEFAULT_VARIANTS, examples: int = 2000,
                eval_docs: int = 100, batch_size: int = 8, max_length: int = 256,
                steps: int = 40, seeds: int = 2, out: Path | None = None) -> dict:
    """Every variant, ``seeds`` times; written to ``out`` after every run.

    Returns:
        ``{"setup", "machine", "base", "runs": {variant: [per-seed figures]},
        "summary": {variant: ...}}``.
    """
    for v in variants:
        variant_overrides(v)  # refuse a bad name before the first run
    setup = task_overrides(model, tasks, examples, eval_docs, batch_size, max_length, steps)
    results = {"setup": {"model": model, "tasks": tasks, "examples": examples,
                         "eval_docs": eval_docs, "batch_size": batch_size,
                         "max_length": max_length, "steps": steps, "seeds": seeds,
                         "overrides": setup},
               "machine": cpu_info(), "base": None, "runs": {v: [] for v in variants},
               "summary": {}}
    with tempfile.TemporaryDirectory(prefix="leantune-bench-tasks-") as tmp:
        for s in range(seeds):
            order = list(variants) if s % 2 == 0 else list(reversed(variants))
            for variant in order:
                # LoRA's "before" is the base model itself (B = 0): scored once.
                before = results["base"] is None and variant.startswith("lora")
                run = run_variant(variant, setup, Path(tmp), 42 + s, before)
                if before:
                    results["base"] = run["accuracy"]["before"]
                results["runs"][variant].append(run)
                results["summary"] = summarize(results)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1))
    return results


def summarize(results: dict) -> dict:
    """Per variant: parameters, mean tokens/s and FLOPs, each seed's macro accuracy and
    their mean, and per task the mean accuracy over seeds."""
    out = {}
    for variant, runs in results["runs"].items():
        if not runs:
            continue
        after = [r["accuracy"]["after"] for r in runs]
        out[variant] = {
            "lr": runs[0]["lr"], "trainable_params": runs[0]["trainable_params"],
            "total_params": runs[0]["total_params"],
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in runs),
            "train_flops": statistics.mean(r["train_flops"] for r in runs),
            "macro_acc": [a["macro"]["acc"] for a in after],
            "macro_acc_ci": [a["macro"]["acc_ci"] for a in after],
            "macro_acc_mean": statistics.mean(a["macro"]["acc"] for a in after),
            "tasks": {t: statistics.mean(a["tasks"][t]["acc"] for a in after)
                      for t in after[0]["tasks"]}}
    lora = next((m for v, m in out.items() if v.split("@")[0].startswith("lora_r8")), None)
    if lora is not None:
        for m in out.values():
            m["params_vs_lora_r8"] = lora["trainable_params"] / m["trainable_params"]
    return out


def format_table(results: dict) -> str:
    """The Markdown table of BENCHMARKS.md: accuracy (%) per task, seed means."""
    summary, base = results["summary"], results["base"]
    names = list(next(iter(summary.values()))["tasks"]) if summary else []
    head = ("| method | LR | trainable params | × fewer than LoRA r8 | tokens/s | "
            + " | ".join(names) + " | macro (seeds) | macro mean |")
    rows = [head, "|" + "---|" * (7 + len(names))]
    if base:
        rows.append("| base (before) | – | – | – | – | " + " | ".join(
            f"{100 * base['tasks'][t]['acc']:.1f}" for t in names)
            + f" | {100 * base['macro']['acc']:.1f} | {100 * base['macro']['acc']:.1f} |")
    for variant, m in summary.items():
        ratio = f"{m['params_vs_lora_r8']:.1f}" if "params_vs_lora_r8" in m else "–"
        rows.append(
            f"| {variant} | {m['lr']:g} | {m['trainable_params']:,} | {ratio} | "
            f"{m['tokens_per_second']:.0f} | "
            + " | ".join(f"{100 * m['tasks'][t]:.1f}" for t in names)
            + f" | {' / '.join(f'{100 * a:.1f}' for a in m['macro_acc'])} | "
              f"**{100 * m['macro_acc_mean']:.1f}** |")
    return "\n".join(rows)
