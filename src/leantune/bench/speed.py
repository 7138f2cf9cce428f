"""``leantune bench speed``: training throughput, MFU, peak memory and the held-out loss
after the same steps, for leantune's precisions and chunked loss against TRL's
``SFTTrainer`` (padded, padding-free) and a bare HF + PEFT loop, LoRA and full
fine-tuning, on the quickstart model and single ShareGPT exchanges.

One job: every arm (:mod:`leantune.bench.speed_arms`) runs in a fresh child process (its
peak resident memory is its own, not the high-water mark of the arms before it), the
arms alternate within each round, and the medians over rounds are reported with ratios:
tokens/s to TRL padded and to the bare fp32 loop, memory to the bare fp32 loop.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from leantune.bench.common import cpu_info
from leantune.config import ModelConfig
from leantune.model.load import resolve_local
from leantune.model.precision import choose

# name: (impl, method, layout, precision, chunked[, extra spec: base_dtype (model.dtype),
# gradient_checkpointing])
ARMS: dict[str, tuple] = {  # names without commas: --arms splits on them
    "leantune default (auto)": ("leantune", "lora", "online", "auto", True),
    "leantune fp32": ("leantune", "lora", "online", "fp32", True),
    "leantune fp32 plain loss": ("leantune", "lora", "online", "fp32", False),
    "leantune bf16-mixed": ("leantune", "lora", "online", "bf16-mixed", True),
    "leantune bf16-mixed compiled": ("leantune", "lora", "online", "bf16-mixed", True,
                                     {"compile": True}),
    "leantune fp32 compiled": ("leantune", "lora", "online", "fp32", True, {"compile": True}),
    "leantune bf16-mixed bf16 base": ("leantune", "lora", "online", "bf16-mixed", True,
                                      {"base_dtype": "bfloat16"}),
    "leantune fp32 checkpointing": ("leantune", "lora", "online", "fp32", True,
                                    {"gradient_checkpointing": True}),
    "leantune bf16": ("leantune", "lora", "online", "bf16", True),
    "leantune padded fp32": ("leantune", "lora", "none", "fp32", True),
    "TRL padded": ("trl", "lora", "padded", "fp32", False),
    "TRL padding-free": ("trl", "lora", "padding_free", "fp32", False),
    "TRL padded bf16": ("trl", "lora", "padded", "bf16-mixed", False),
    "TRL padding-free bf16": ("trl", "lora", "padding_free", "bf16-mixed", False),
    "bare HF+PEFT fp32": ("bare", "lora", "padded", "fp32", False),
    "bare HF+PEFT bf16 autocast": ("bare", "lora", "padded", "bf16-mixed", False),
    "full: leantune auto": ("leantune", "full", "online", "auto", True),
    "full: leantune bf16-mixed": ("leantune", "full", "online", "bf16-mixed", True),
    "full: bare HF fp32": ("bare", "full", "padded", "fp32", False),
}
BASELINE, PEER = "bare HF+PEFT fp32", "TRL padded"


def run_child(spec: dict, timeout: float = 3600,
              module: str = "leantune.bench.speed_arms") -> dict:
    """Run one arm (``python -m module SPEC OUT``) in a fresh interpreter; its JSON result
    (or the error it died of)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", module,
                               str(spec_path), str(out_path)], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"arm {spec['name']!r} failed (rc {proc.returncode}): "
                               + " | ".join(tail))
        return json.loads(out_path.read_text())


def peaks(model: str) -> dict[str, float]:
    """This machine's matmul peak per compute dtype (measured once, cached)."""
    source = resolve_local(ModelConfig(name_or_path=model))
    config = AutoConfig.from_pretrained(source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {p: choose(p, "auto", config, device).peak_flops for p in ("fp32", "bf16")}


def bench_speed(model: str = "embedded:smollm2", examples: int = 32, eval_examples: int = 16,
                batch_size: int = 8, max_length: int = 512, rounds: int = 2, lr: float = 2e-4,
                arms: list[str] | None = None, out: Path | None = None,
                examples_file: str | None = None) -> dict:
    """Every arm in ``arms`` (default: all that can run here) ``rounds`` times, alternately."""
    names = arms or [n for n, a in ARMS.items() if a[0] != "trl" or _has_trl()]
    unknown = sorted(set(names) - ARMS.keys())
    if unknown:
        raise ValueError(f"unknown arm {unknown}; choose from {list(ARMS)}")
    setup = {"model": model, "examples": examples, "eval_examples": eval_examples,
             "batch_size": batch_size, "max_length": max_length, "rounds": rounds, "lr": lr,
             "threads": torch.get_num_threads(), "lora": "r16 alpha32 all-linear, no dropout",
             "cpu": cpu_info(), "peak_flops": peaks(model)}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            impl, method, layout, precision, chunked, *extra = ARMS[name]
            spec = {"name": name, "impl": impl, "method": method, "layout": layout,
                    "precision": precision, "chunked": chunked, "model": model,
                    **(extra[0] if extra else {}),
                    "examples": examples, "eval_examples": eval_examples,
                    "batch_size": batch_size, "max_length": max_length, "lr": lr,
                    "examples_file": examples_file}
            result = run_child(spec)
            runs[name].append(result)
            print(f"round {r + 1}/{rounds} {name:28s} {result['tokens_per_second']:7.1f} tokens/s"
                  f"  peak {result['peak_memory_bytes'] / 2**30:5.2f} GiB  eval loss "
                  f"{result['eval_loss']:.4f}", flush=True)
        results = summarize(runs, setup)
        if out is not None:  # after every round: a later crash loses nothing
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def _peak_key(run: dict) -> str:
    used = run.get("precision_used", run["precision"])
    return "fp32" if used == "fp32" else "bf16"


def summarize(runs: dict[str, list[dict]], setup: dict) -> dict:
    """Medians over rounds, MFU against the peak in each arm's compute dtype, and ratios."""
    keys = ("tokens_per_second", "seconds", "peak_memory_bytes", "peak_memory_delta_bytes",
            "eval_loss", "optimizer_steps", "flops")
    med = {}
    for name, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in keys}
        dtype = _peak_key(rs[0])
        m["precision_used"] = rs[0].get("precision_used", rs[0]["precision"])
        m["mfu"] = m["flops"] / m["seconds"] / setup["peak_flops"][dtype]
        if rs[0].get("compile_seconds") is not None:  # compiled arms: the compile, untimed
            m["compile_seconds"] = statistics.median(r["compile_seconds"] for r in rs)
        med[name] = m
    for m in med.values():
        for ref, label in ((BASELINE, "bare_fp32"), (PEER, "trl_padded")):
            if ref in med:
                m[f"speed_vs_{label}"] = m["tokens_per_second"] / med[ref]["tokens_per_second"]
        if BASELINE in med:
            m["memory_vs_bare_fp32"] = m["peak_memory_bytes"] / med[BASELINE]["peak_memory_bytes"]
            m["eval_loss_minus_bare_fp32"] = m["eval_loss"] - med[BASELINE]["eval_loss"]
    return {"median": med, "runs": runs, "setup": setup}


def format_table(results: dict) -> str:
    rows = ["| arm | precision | tokens/s | × TRL padded | × bare fp32 | MFU | peak RSS (GiB) "
            "| × bare fp32 | eval loss |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["median"].items():
        trl = m.get("speed_vs_trl_padded")
        rows.append(f"| {name} | {m['precision_used']} | {m['tokens_per_second']:.1f} | "
                    f"{'–' if trl is None else f'{trl:.2f}'} | "
                    f"{m.get('speed_vs_bare_fp32', float('nan')):.2f} | {m['mfu']:.1%} | "
                    f"{m['peak_memory_bytes'] / 2**30:.2f} | "
                    f"{m.get('memory_vs_bare_fp32', float('nan')):.2f} | {m['eval_loss']:.4f} |")
    return "\n".join(rows)
