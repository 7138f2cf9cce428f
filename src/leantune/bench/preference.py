"""``leantune bench preference``: DPO and its kin against TRL, and whether they make the
model better, on the embedded SmolLM2 and pairs built from the task suite (the gold
answer chosen, a seeded wrong one rejected: :func:`~leantune.data.tasks.task_pair_rows`).

Three parts, one job, every arm in a fresh interpreter
(:mod:`leantune.bench.preference_arms`), run alone:

- ``speed``: TRL ``DPOTrainer`` (padded) against leantune padded, packed, and packed with
  the prompt shared, on the same pairs in the same order, LoRA r16, fp32, the same steps;
  arms alternate within each round; medians of training seconds, the pairs' tokens per
  second (``2 * prompt + chosen + rejected``: what a row per completion holds, the same
  count for every arm) and peak resident memory, with ratios to TRL, and the per-step
  losses side by side.
- ``quality``: the base model, SFT on the gold answers, DPO, SimPO and ORPO on the same
  training documents and optimizer steps, LoRA and LoReFT, each seed; multiple-choice
  accuracy on the tasks' validation documents and held-out pair accuracy (validation
  pairs, raw log-prob margin) after.
- ``fast_forward``: DPO (lr 5e-4) with and without Fast Forward (its defaults); the FLOPs and
  seconds with FF to reach the plain run's best held-out DPO loss.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from leantune.bench.common import cpu_info
from leantune.bench.speed import run_child
from leantune.config.tasks import task_names

TASKS = "arc-e,piqa,siqa,boolq"
# leantune's arms as TRL runs: a constant LR, no held-out set (TRL's arm evaluates nothing)
AS_TRL = ["schedule.kind=constant", "data.eval_fraction=0", "eval.before=false"]
ARMS = {"TRL DPOTrainer": {"impl": "trl"},
        "leantune padded": {"impl": "leantune", "extra": AS_TRL + ["data.packing=none"]},
        "leantune packed": {"impl": "leantune", "extra": AS_TRL + [
            "data.packing=online", "objective.shared_prompt=false"]},
        "leantune packed+shared prompt": {"impl": "leantune",
                                          "extra": AS_TRL + ["data.packing=online"]}}
PEER = "TRL DPOTrainer"
MODULE = "leantune.bench.preference_arms"


def write_pairs(path: Path, split: str, n: int, seed: int = 0, tasks: str = TASKS
                ) -> list[dict]:
    """``n`` pair rows of the ``tasks``' ``split`` (seeded shuffle), written as JSONL."""
    from leantune.data.tasks import task_pair_rows

    rows = [r.record for r in task_pair_rows(f"task:{tasks}", split)]
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def leantune_order(path: Path, model: str, batch_size: int, steps: int, max_length: int,
                   seed: int) -> tuple[list[dict], int]:
    """The rows in the order leantune's first epoch takes them (for TRL, sequentially),
    and their tokens as a row per completion holds them (``2 P + C + R`` per pair)."""
    from transformers import AutoTokenizer

    from leantune.config import DataConfig, ModelConfig
    from leantune.data.preference import PreferenceStats, encode_preference, to_preference
    from leantune.data.preference_sets import build_preference_splits
    from leantune.data.rows import Row
    from leantune.model.load import resolve_local
    from leantune.packing.batching import epoch_batches

    tokenizer = AutoTokenizer.from_pretrained(resolve_local(ModelConfig(name_or_path=model)))
    rows = [json.loads(line) for line in open(path)]
    key = {}
    for r in rows:
        e = encode_preference(to_preference(Row(str(path), "", r), "pairs"), tokenizer,
                              max_length, PreferenceStats())
        if e is not None:
            key[(tuple(e.prompt), tuple(e.chosen), tuple(e.rejected))] = r
    train = build_preference_splits(DataConfig(path=str(path), eval_fraction=0.0,
                                               max_length=max_length), tokenizer, seed,
                                    "dpo").train
    order = [i for b in epoch_batches(len(train), batch_size, seed, 0) for i in b]
    taken = [train[i] for i in order[:batch_size * steps]]
    if len(taken) < batch_size * steps:
        raise ValueError(f"{len(train)} pairs are fewer than {steps} steps x {batch_size}")
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in taken)
    return [key[(tuple(p.prompt), tuple(p.chosen), tuple(p.rejected))] for p in taken], tokens


def bench_speed(tmp: Path, model: str, pairs: int, steps: int, batch_size: int,
                max_length: int, rounds: int, lr: float, seed: int = 0, tasks: str = TASKS
                ) -> dict:
    data = tmp / "speed_pairs.jsonl"
    write_pairs(data, "train", pairs, seed, tasks)
    ordered, tokens = leantune_order(data, model, batch_size, steps, max_length, seed)
    ordered_file = tmp / "speed_ordered.jsonl"
    ordered_file.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    runs: dict[str, list[dict]] = {name: [] for name in ARMS}
    for r in range(rounds):
        for name, arm in ARMS.items():
            spec = {"model": model, "data": str(data), "ordered_file": str(ordered_file),
                    "objective": "dpo", "batch_size": batch_size, "steps": steps, "lr": lr,
                    "max_length": max_length, "seed": seed, "name": name, **arm}
            result = run_child(spec, module=MODULE)
            result["tokens_per_second"] = tokens / result["seconds"]
            runs[name].append(result)
            print(f"speed round {r + 1}/{rounds} {name:30s} {result['tokens_per_second']:7.1f} "
                  f"tokens/s  peak {result['peak_memory_bytes'] / 2**30:5.2f} GiB  last loss "
                  f"{result['losses'][-1]:.4f}", flush=True)
    med = {}
    for name, rs in runs.items():
        med[name] = {k: statistics.median(r[k] for r in rs)
                     for k in ("seconds", "tokens_per_second", "peak_memory_bytes")}
        med[name]["losses"] = rs[0]["losses"]
        med[name]["layout"] = rs[0].get("layout")
    for m in med.values():
        m["speed_vs_trl"] = m["tokens_per_second"] / med[PEER]["tokens_per_second"]
        m["memory_vs_trl"] = m["peak_memory_bytes"] / med[PEER]["peak_memory_bytes"]
    return {"setup": {"pairs": pairs, "steps": steps, "batch_size": batch_size,
                      "max_length": max_length, "rounds": rounds, "lr": lr,
                      "pair_tokens": tokens}, "median": med, "runs": runs}


def bench_quality(tmp: Path, model: str, pairs: int, steps: int, batch_size: int,
                  max_length: int, seeds: list[int], adapters: list[str],
                  task_examples: int, held_out: int, lrs: dict[str, float],
                  tasks: str = TASKS) -> dict:
    """Every objective x adapter x seed from the same base, scored the same way."""
    train = tmp / "quality_pairs.jsonl"
    rows = write_pairs(train, "train", pairs, tasks=tasks)
    gold = tmp / "quality_gold.jsonl"  # the same documents' gold answers, for SFT
    gold.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]})
                            + "\n" for r in rows))
    held = tmp / "quality_held_out.jsonl"
    write_pairs(held, "validation", held_out, tasks=tasks)
    common = {"impl": "score", "model": model, "batch_size": batch_size, "steps": steps,
              "max_length": max_length, "tasks": task_names(tasks), "task_examples": task_examples,
              "held_out": str(held)}
    out = {"base": run_child(common | {"objective": "base", "seed": 0, "name": "base"},
                             module=MODULE)}
    print(f"quality base: macro {out['base']['macro']['acc']:.3f}, pairs "
          f"{out['base']['pair_accuracy']:.3f}", flush=True)
    for seed in seeds:
        for adapter in adapters:
            for objective in ("sft", "dpo", "simpo", "orpo"):
                name = f"{objective} {adapter} seed {seed}"
                spec = common | {"name": name, "objective": objective, "adapter": adapter,
                                 "seed": seed,
                                 "data": str(gold if objective == "sft" else train),
                                 "lr": lrs[adapter],
                                 "extra": ["eval.before=false", "data.eval_fraction=0"]}
                r = out[name] = run_child(spec, module=MODULE)
                print(f"quality {objective:5s} {adapter:6s} seed {seed}: macro "
                      f"{r['macro']['acc']:.3f}, pairs {r['pair_accuracy']:.3f}", flush=True)
    return {"setup": {"pairs": pairs, "steps": steps, "batch_size": batch_size, "lrs": lrs,
                      "seeds": seeds, "adapters": adapters, "task_examples": task_examples,
                      "held_out_pairs": held_out}, "arms": out}


def bench_fast_forward(tmp: Path, model: str, pairs: int, steps: int, batch_size: int,
                       max_length: int, lr: float, every: int, tasks: str = TASKS) -> dict:
    """DPO without and with Fast Forward; cost with FF to reach the plain run's end loss."""
    data = tmp / "ff_pairs.jsonl"
    write_pairs(data, "train", pairs, tasks=tasks)
    base = {"impl": "leantune", "model": model, "data": str(data), "objective": "dpo",
            "batch_size": batch_size, "steps": steps, "lr": lr, "max_length": max_length,
            "seed": 0}
    evals = [f"eval.every={every}", "data.eval_examples=32"]
    plain = run_child(base | {"name": "plain", "extra": evals}, module=MODULE)
    ff = run_child(base | {"name": "fast forward",
                           "extra": evals + ["fast_forward.enabled=true"]}, module=MODULE)
    # DPO's held-out loss may turn up again (it overfits): the target is the plain run's
    # best held-out loss after step 0, and FF's cost is what it took to get as low
    target = min((e for e in plain["evals"] if e["step"] > 0), key=lambda e: e["loss"])
    reached = next((e for e in ff["evals"] if e["step"] > 0 and e["loss"] <= target["loss"]),
                   None)
    saved = None
    if reached is not None:
        saved = {"flops": 1 - reached["flops"] / target["flops"],
                 "seconds": 1 - reached["compute_seconds"] / target["compute_seconds"],
                 "step": reached["step"]}
    print(f"fast forward: plain reaches {target['loss']:.4f} at step {target['step']}; FF "
          f"{'never' if reached is None else 'at step ' + str(reached['step'])}", flush=True)
    return {"target": target, "reached": reached, "saved": saved, "plain": plain, "ff": ff}


def bench_preference(model: str = "embedded:smollm2", parts: tuple[str, ...] = (
        "speed", "quality", "fast_forward"), out: Path | None = None, speed_steps: int = 8,
        rounds: int = 2, quality_steps: int = 40, seeds: tuple[int, ...] = (0, 1),
        adapters: tuple[str, ...] = ("lora", "loreft"), task_examples: int = 40,
        held_out: int = 80, ff_steps: int = 48, max_length: int = 256,
        batch_size: int = 8, tasks: str = TASKS, speed_pairs: int = 400,
        ff_lr: float = 5e-4) -> dict:
    results: dict = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "model": model,
                     "tasks": tasks}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for part in parts:
            if part == "speed":
                results["speed"] = bench_speed(tmp, model, speed_pairs, speed_steps,
                                               batch_size, max_length, rounds, lr=2e-3,
                                               tasks=tasks)
            elif part == "quality":
                results["quality"] = bench_quality(
                    tmp, model, quality_steps * batch_size, quality_steps, batch_size,
                    max_length, list(seeds), list(adapters), task_examples, held_out,
                    {"lora": 2e-3, "loreft": 2e-3}, tasks)
            elif part == "fast_forward":
                results["fast_forward"] = bench_fast_forward(
                    tmp, model, ff_steps * batch_size, ff_steps, batch_size, max_length,
                    lr=ff_lr, every=4, tasks=tasks)
            else:
                raise ValueError(f"unknown part {part!r}; speed, quality or fast_forward")
            if out is not None:  # after every part: a later crash loses nothing
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_tables(results: dict) -> str:
    """The markdown tables BENCHMARKS.md shows."""
    out = [f"CPU: {results['cpu'].get('model', results['cpu'])}, {results['threads']} threads"]
    if "speed" in results:
        out += ["", "| arm | layout | pair tokens/s | × TRL | peak RSS (GiB) | × TRL "
                "| loss at steps 1 / last |", "|---|---|---|---|---|---|---|"]
        for name, m in results["speed"]["median"].items():
            out.append(f"| {name} | {m['layout'] or 'padded'} | {m['tokens_per_second']:.1f} "
                       f"| {m['speed_vs_trl']:.2f} | {m['peak_memory_bytes'] / 2**30:.2f} | "
                       f"{m['memory_vs_trl']:.2f} | {m['losses'][0]:.4f} / "
                       f"{m['losses'][-1]:.4f} |")
    if "quality" in results:
        names = task_names(results["tasks"])
        out += ["", "| arm | macro acc | " + " | ".join(names) +
                " | held-out pair acc | mean margin |", "|---" * (4 + len(names)) + "|"]
        for name, r in results["quality"]["arms"].items():
            accs = " | ".join(f"{100 * t['acc']:.1f}" for t in r["tasks"].values())
            lo, hi = r["pair_accuracy_ci"]
            out.append(f"| {name} | {100 * r['macro']['acc']:.1f} | {accs} | "
                       f"{100 * r['pair_accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                       f"{r['pair_margin']:.3f} |")
    if "fast_forward" in results:
        f = results["fast_forward"]
        saved = f["saved"]
        out += ["", f"Fast Forward on DPO: the plain run's best held-out loss is "
                f"{f['target']['loss']:.4f} (step {f['target']['step']}); with FF "
                + ("it is never reached" if saved is None else
                   f"it is reached at step {saved['step']}: {100 * saved['flops']:.1f} % of "
                   f"the FLOPs and {100 * saved['seconds']:.1f} % of the seconds saved")
                + f" ({f['ff']['ff_steps_accepted']} FF steps accepted)."]
    return "\n".join(out)
