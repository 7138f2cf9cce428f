"""``leantune bench packing``: padding vs. online vs. offline packing (and TRL's packed
``SFTTrainer`` when TRL is installed), in one process, alternately, on single ShareGPT
exchanges: a real long-tailed length mix.

Each round trains every mode from the same LoRA initialization over the same examples
(``none`` and ``online`` see identical micro-batches; ``offline`` and TRL see the same
examples packed ahead of time, so they take fewer optimizer steps), then measures the
held-out loss. Reported: real and target tokens/s, padding fraction, peak memory above
the start of the phase, eval loss, each also as a ratio to ``none`` (medians over rounds).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from leantune.adapters import build_adapter
from leantune.bench.common import sharegpt_exchanges
from leantune.config import AdapterConfig, ModelConfig
from leantune.data.encode import Encoded
from leantune.eval.loss import evaluate
from leantune.model.compile import CompiledBlocks
from leantune.model.load import load_model, load_tokenizer, resolve_local
from leantune.objectives import NEXT_TOKEN
from leantune.packing.batching import Batcher
from leantune.train.metrics import PeakMemory
from leantune.train.step import train_step

MODES = ("none", "online", "offline")


def _batches(batcher: Batcher, batch_size: int, seed: int) -> list[list[int]]:
    units = list(range(len(batcher.units)))
    if batcher.mode == "offline":  # BFD emits rows longest first: spread them out
        random.Random(seed).shuffle(units)
    return [units[i : i + batch_size] for i in range(0, len(units), batch_size)]


def split_rows(batch: dict[str, torch.Tensor], micro_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Cut a collated batch [R, T] into micro-batches of whole rows, each of at most
    ``micro_tokens`` positions (at least one row). The step's loss is normalized over all of
    them together, so this changes memory, not the update."""
    per = max(1, micro_tokens // batch["input_ids"].shape[1])
    rows = batch["input_ids"].shape[0]
    return [{k: v[i : i + per] if v.dim() else v for k, v in batch.items()}
            for i in range(0, rows, per)]


def run_mode(model, init: dict, mode: str, train: list[Encoded], held_out: list[Encoded],
             batch_size: int, max_length: int, pad_id: int, lr: float, acc: Accelerator,
             micro_tokens: int = 4096, compiled: CompiledBlocks | None = None) -> dict:
    """Train ``model`` from ``init`` over ``train`` with one packing mode; time it.

    Each optimizer step covers ``batch_size`` units (examples, or rows for ``offline``),
    run as micro-batches of at most ``micro_tokens`` positions to bound memory. With
    ``compiled`` (train.compile's layers), the steps run compiled; the compiles (the first
    shapes, then symbolic ones) happen in forward/backward passes over the first two
    steps' batches before the clock starts, no update made, timed apart
    (``compile_seconds``)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[name])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batcher = Batcher.build(train, mode, max_length, pad_id, "bfd")
    steps = _batches(batcher, batch_size, seed=0)
    seconds = real = targets = positions = rows = 0
    model.train()
    active = compiled.active if compiled is not None else nullcontext
    compile_seconds = None
    if compiled is not None:
        tick = time.perf_counter()
        for unit_ids in steps[:2]:
            with active():
                for micro in split_rows(batcher.collate(unit_ids), micro_tokens):
                    NEXT_TOKEN.loss_sum(model, micro).backward()
            model.zero_grad(set_to_none=True)
        compile_seconds = time.perf_counter() - tick
    with PeakMemory() as memory:
        for unit_ids in steps:
            tick = time.perf_counter()
            batch = batcher.collate(unit_ids)
            with active():
                result = train_step(model, optimizer, split_rows(batch, micro_tokens), acc,
                                    max_grad_norm=1.0)
            seconds += time.perf_counter() - tick
            real += int(batch["token_mask"].sum())
            positions += batch["input_ids"].numel()
            rows += batch["input_ids"].shape[0]
            targets += result.count
    eval_loss = evaluate(model, held_out, 8, lambda b: batcher.collate_examples(b, "online"),
                         acc)["loss"]
    return {"mode": mode, "seconds": seconds, "tokens_per_second": real / seconds,
            "target_tokens_per_second": targets / seconds, "padding_fraction": 1 - real / positions,
            "rows": rows, "optimizer_steps": len(steps),
            "peak_memory_delta_bytes": memory.delta, "eval_loss": eval_loss,
            "compile_seconds": compile_seconds}


def bench_packing(model_name: str = "embedded:smollm2", examples: int = 32, eval_examples: int = 16,
                  batch_size: int = 8, max_length: int = 1024, rounds: int = 1, lr: float = 2e-4,
                  trl: bool = True, out: Path | None = None, micro_tokens: int = 4096) -> dict:
    """Run every mode ``rounds`` times, alternately; return (and write) the results."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model_cfg = ModelConfig(name_or_path=model_name)
    source = resolve_local(model_cfg)
    tokenizer = load_tokenizer(model_cfg, source)
    data = sharegpt_exchanges(tokenizer, examples + eval_examples, max_length)
    train, held_out = data[:examples], data[examples:]
    model = build_adapter(AdapterConfig(r=16, alpha=32.0, dropout=0.0)).apply(
        load_model(model_cfg, source))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    runs: dict[str, list[dict]] = {m: [] for m in (*MODES, "trl") if m != "trl" or trl}
    for mode in MODES:  # warm-up: first-touch allocations and kernel choices, untimed
        run_mode(model, init, mode, train[:batch_size], held_out[:2], batch_size, max_length,
                 tokenizer.pad_token_id, lr, acc, micro_tokens)
    setup = {"model": model_name, "train_examples": len(train), "eval_examples": len(held_out),
             "batch_size": batch_size, "max_length": max_length, "rounds": rounds, "lr": lr,
             "micro_tokens": micro_tokens,
             "mean_example_tokens": sum(len(e.input_ids) for e in train) / len(train),
             "threads": torch.get_num_threads()}
    for r in range(rounds):
        for mode in MODES:
            runs[mode].append(run_mode(model, init, mode, train, held_out, batch_size,
                                       max_length, tokenizer.pad_token_id, lr, acc,
                                       micro_tokens))
            gc.collect()
            print(f"round {r + 1}/{rounds} {mode:8s} {runs[mode][-1]['tokens_per_second']:7.1f} "
                  f"tokens/s  eval loss {runs[mode][-1]['eval_loss']:.4f}", flush=True)
        if trl:
            from leantune.bench.trl_baseline import run_trl

            runs["trl"].append(run_trl(source, tokenizer, train, held_out, batch_size,
                                       max_length, lr, acc, micro_tokens))
            gc.collect()  # free the trainer's model copy before the next phase
            print(f"round {r + 1}/{rounds} trl      {runs['trl'][-1]['tokens_per_second']:7.1f} "
                  f"tokens/s  eval loss {runs['trl'][-1]['eval_loss']:.4f}", flush=True)
        results = _write(runs, setup, out)  # after every round: a later crash loses nothing
    return results


def _write(runs: dict[str, list[dict]], setup: dict, out: Path | None) -> dict:
    results = summarize(runs) | {"setup": setup}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds, and ratios to padding (``none``)."""
    keys = ("tokens_per_second", "target_tokens_per_second", "padding_fraction",
            "peak_memory_delta_bytes", "eval_loss", "optimizer_steps", "rows", "seconds")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    base = med["none"]
    for m in med:
        med[m]["speedup_vs_none"] = med[m]["tokens_per_second"] / base["tokens_per_second"]
        med[m]["memory_vs_none"] = (med[m]["peak_memory_delta_bytes"]
                                    / max(base["peak_memory_delta_bytes"], 1))
    if "trl" in med:
        best = max(MODES, key=lambda m: med[m]["tokens_per_second"])
        med["best_vs_trl"] = {"mode": best, "ratio": med[best]["tokens_per_second"]
                              / med["trl"]["tokens_per_second"]}
    return {"median": med, "runs": runs}


def format_table(results: dict) -> str:
    rows = ["| mode | tokens/s | × none | target tok/s | padding | steps | peak mem Δ (MiB) | eval loss |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, m in results["median"].items():
        if mode == "best_vs_trl":
            continue
        rows.append(f"| {mode} | {m['tokens_per_second']:.1f} | {m['speedup_vs_none']:.2f} | "
                    f"{m['target_tokens_per_second']:.1f} | {m['padding_fraction']:.1%} | "
                    f"{m['optimizer_steps']:.0f} | {m['peak_memory_delta_bytes'] / 2**20:.0f} | "
                    f"{m['eval_loss']:.4f} |")
    return "\n".join(rows)
