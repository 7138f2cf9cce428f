"""``leantune bench adapters``: every adapter method on the same task and token budget.

Each method trains with ``leantune train`` on the same config (the embedded default:
SmolLM2-135M-Instruct on ShareGPT), differing only in ``adapter.method`` (and, for DoRA,
``adapter.use_dora``), each at its method's default LR (``optim.lr: null``). Same data,
same batches and steps, so every method sees the same target tokens. Round ``k`` uses
seed ``42 + k`` for every method, so the rounds' spread of the eval loss shows the
noise that a difference between methods has to beat.

Each run is its own process, so its memory figures are that method's alone: within one
process freed memory is reused and the high-water mark only grows. The table reports the
peak during training (resident set on CPU, allocated on CUDA) and how much of it training
added on top of the loaded model and data (gradients, optimizer state, activations);
the process-wide peak also counts reading the data set. With ``rounds > 1`` the order
reverses every other round, so a slow spell on the machine does not always land on the
same method; medians reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

VARIANTS = {"lora": ["adapter.method=lora"],
            "dora": ["adapter.method=lora", "adapter.use_dora=true"],
            "qlora": ["adapter.method=qlora"],
            "ia3": ["adapter.method=ia3"],
            "prompt_tuning": ["adapter.method=prompt_tuning"],
            "full": ["adapter.method=full"],
            # `leantune bench reft`: the paper's comparison (LoRA r8 vs ReFT r4, f7+l7,
            # every layer, tied: its instruction-tuning rank with its commonsense layout).
            "lora_r8": ["adapter.method=lora", "adapter.r=8"],
            "loreft": ["adapter.method=loreft", "adapter.r=4"],
            "direft": ["adapter.method=direft", "adapter.r=4"]}
DEFAULT_METHODS = ("lora", "dora", "qlora", "ia3", "prompt_tuning", "full")
KEPT = ("trainable_params", "total_params", "tokens_per_second", "peak_memory_bytes",
        "train_memory_bytes", "base_memory_bytes", "train_seconds", "train_flops", "optimizer_steps",
        "train_tokens", "padding_fraction", "packing", "optim_lr")


def task_overrides(model: str, data: str, examples: int, eval_examples: int, batch_size: int,
                   max_length: int, steps: int) -> list[str]:
    """The shared task: everything but the method."""
    return [f"model.name_or_path={model}", f"data.path={data}", f"data.max_length={max_length}",
            f"data.max_examples={examples}", f"data.eval_examples={eval_examples}",
            "data.skip_bad_rows=true", f"train.batch_size={batch_size}",
            f"train.max_steps={steps}", "train.progress=false", "optim.lr=null",
            "schedule.kind=cosine", "eval.generate=0", "checkpoint.every=null"]


def run_method(variant: str, task: list[str], work: Path, seed: int = 42) -> dict:
    """Train one variant in a fresh process; its summary figures (and its LR, seed)."""
    out = work / variant
    cmd = [sys.executable, "-m", "leantune", "train", *task, *VARIANTS[variant],
           f"train.output_dir={out}", f"train.seed={seed}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    # Plain YAML, not load_config: this process's config schema may be older than the
    # child's (an edited checkout), and only one value is needed.
    summary["optim_lr"] = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]
    return {k: summary[k] for k in KEPT} | {
        "seed": seed, "eval_loss_before": summary["eval_loss"]["before"],
        "eval_loss_after": summary["eval_loss"]["after"]}


def bench_adapters(model: str = "embedded:smollm2", data: str = "embedded:sharegpt",
                   methods: list[str] = DEFAULT_METHODS, examples: int = 200,
                   eval_examples: int = 32, batch_size: int = 8, max_length: int = 128,
                   steps: int = 12, rounds: int = 1, out: Path | None = None,
                   overrides: list[str] = ()) -> dict:
    """Run every method ``rounds`` times (alternating order) and summarize.

    ``overrides`` (``section.key=value``) apply to every method's run, after the task's.

    Returns:
        ``{"setup", "runs": {method: [per-round figures]}, "median": {method: figures}}``;
        written to ``out`` as JSON after every run (a crash keeps what finished).
    """
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(VARIANTS)}")
    task = task_overrides(model, data, examples, eval_examples, batch_size, max_length, steps)
    task += list(overrides)  # e.g. optim.lr=4e-3: applied to every method, after the task
    results = {"setup": {"model": model, "data": data, "examples": examples,
                         "eval_examples": eval_examples, "batch_size": batch_size,
                         "max_length": max_length, "steps": steps, "rounds": rounds,
                         "overrides": list(overrides)},
               "runs": {m: [] for m in methods}, "median": {}}
    with tempfile.TemporaryDirectory(prefix="leantune-bench-adapters-") as tmp:
        for r in range(rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for method in order:
                # Each round its own seed (data order, split, init): the spread of the eval
                # loss over rounds is the noise a difference between methods must beat.
                results["runs"][method].append(
                    run_method(method, task, Path(tmp) / f"r{r}", seed=42 + r))
                results["median"] = summarize(results["runs"])
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1))
    return results


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per method: the first run's fixed figures with medians of the measured ones, and
    tokens/s relative to LoRA and to full fine-tuning where those ran."""
    med = {}
    for method, rs in runs.items():
        if not rs:
            continue
        med[method] = dict(rs[0]) | {
            k: statistics.median(r[k] for r in rs)
            for k in ("tokens_per_second", "peak_memory_bytes", "train_seconds")} | {
            "train_memory_bytes": {k: statistics.median(r["train_memory_bytes"][k] for r in rs)
                                   for k in ("at_start", "peak")},
            "eval_loss_before": statistics.median(r["eval_loss_before"] for r in rs),
            "eval_loss_after": statistics.median(r["eval_loss_after"] for r in rs),
            "eval_loss_after_range": [min(r["eval_loss_after"] for r in rs),
                                      max(r["eval_loss_after"] for r in rs)]}
    for ref in ("lora", "full", "lora_r8"):
        if ref in med:
            for m in med.values():
                m[f"speed_vs_{ref}"] = m["tokens_per_second"] / med[ref]["tokens_per_second"]
    return med


def params_ratio(results: dict, reference: str, method: str) -> float:
    """How many times fewer trainable parameters ``method`` has than ``reference``."""
    med = results["median"]
    return med[reference]["trainable_params"] / med[method]["trainable_params"]


def _spread(m: dict) -> str:
    low, high = m["eval_loss_after_range"]
    return f" ({low:.4f}–{high:.4f})" if high > low else ""


def format_table(results: dict) -> str:
    """The side-by-side Markdown table of BENCHMARKS.md."""
    rows = ["| method | LR | trainable params | % of total | tokens/s | × full FT | "
            "peak in training | added by training | base weights | eval loss before → after |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in results["median"].items():
        share = 100 * m["trainable_params"] / m["total_params"]
        vs_full = f"{m['speed_vs_full']:.2f}" if "speed_vs_full" in m else "–"
        rows.append(
            f"| {method} | {m['optim_lr']:g} | {m['trainable_params']:,} | {share:.3f}% | "
            f"{m['tokens_per_second']:.1f} | {vs_full} | "
            f"{m['train_memory_bytes']['peak'] / 2**30:.2f} GiB | "
            f"{(m['train_memory_bytes']['peak'] - m['train_memory_bytes']['at_start']) / 2**30:.2f}"
            " GiB | "
            f"{m['base_memory_bytes']['loaded'] / 2**20:.0f} MiB | "
            f"{m['eval_loss_before']:.4f} → {m['eval_loss_after']:.4f}{_spread(m)} |")
    return "\n".join(rows)
