"""``leantune bench grpo``: GRPO against TRL's ``GRPOTrainer`` on the embedded SmolLM2,
on the package's addition problems, run alone.

Both arms take the same prompts in the same order (leantune's first epoch, written out
for TRL to read sequentially), the same reward function (``numeric_match``), LoRA r16,
``G`` completions of at most ``max_completion_length`` tokens per prompt, temperature 1,
beta 0 (no reference), TRL's default ``dapo`` loss, a constant LR, fp32; each arm in a
fresh interpreter, the arms alternating within each round. Reported per arm: medians over
rounds of the seconds per step (split into sampling and the rest), completion tokens per
second of sampling, peak resident memory, and every step's mean reward (the curves side
by side: sampling differs, so they agree in trend, not value).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

from leantune.bench.common import cpu_info
from leantune.bench.speed import run_child

MODULE = "leantune.bench.grpo_arms"
ARMS = {"TRL GRPOTrainer": {"impl": "trl"},
        "leantune": {"impl": "leantune"},
        "leantune, no shared prompt": {"impl": "leantune",
                                       "extra": ["objective.shared_prompt=false"]}}
PEER = "TRL GRPOTrainer"


def leantune_order(path: Path, model: str, batch_size: int, steps: int, max_length: int,
                   max_completion: int, seed: int) -> list[dict]:
    """The prompt rows in the order leantune's steps take them (one process)."""
    from transformers import AutoTokenizer

    from leantune.config import load_config
    from leantune.data.prompt_sets import build_prompt_splits
    from leantune.model.load import resolve_local
    from leantune.train.rollouts import Rollouts

    cfg = load_config(None, [f"model.name_or_path={model}", f"data.path={path}",
                             "objective.kind=grpo", f"train.batch_size={batch_size}",
                             f"train.seed={seed}", f"data.max_length={max_length}",
                             "data.eval_fraction=0"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_local(cfg.model))
    splits = build_prompt_splits(cfg.data, tokenizer, seed, max_completion)
    acc = SimpleNamespace(num_processes=1, process_index=0)
    rollouts = Rollouts(cfg, splits, tokenizer, acc)
    taken = [p for s in range(steps) for p in rollouts.prompts_of(s)]
    return [{"prompt": p.prompt, **p.columns} for p in taken]


def bench_grpo(out: Path, model: str = "embedded:smollm2", problems: str = "problems:add",
               steps: int = 9, batch_size: int = 8, num_generations: int = 8,
               max_completion_length: int = 16, rounds: int = 2, lr: float = 1e-4,
               seed: int = 0) -> dict:
    """Run the arms ``rounds`` times, alternating; the results JSON (also written to
    ``out``)."""
    import tempfile

    from leantune.data.prompt_sets import problem_source

    max_length = 128
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps(r.record) + "\n" for r in problem_source(problems)))
        ordered = Path(tmp) / "ordered.jsonl"
        rows = leantune_order(data, model, batch_size, steps, max_length,
                              max_completion_length, seed)
        ordered.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs: dict[str, list[dict]] = {name: [] for name in ARMS}
        for r in range(rounds):
            for name, arm in ARMS.items():
                spec = {"model": model, "data": str(data), "ordered_file": str(ordered),
                        "reward": "numeric_match", "batch_size": batch_size, "steps": steps,
                        "num_generations": num_generations, "lr": lr, "seed": seed,
                        "max_completion_length": max_completion_length,
                        "max_length": max_length, "name": name, **arm}
                result = run_child(spec, module=MODULE)
                runs[name].append(result)
                print(f"grpo round {r + 1}/{rounds} {name:28s} "
                      f"{result['seconds'] / steps:6.1f} s/step  peak "
                      f"{result['peak_memory_bytes'] / 2**30:5.2f} GiB  rewards "
                      + " ".join(f"{x:.2f}" for x in result["rewards"]), flush=True)
    results = {"cpu": cpu_info(), "model": model, "problems": problems, "steps": steps,
               "prompts_per_step": batch_size, "num_generations": num_generations,
               "max_completion_length": max_completion_length, "lr": lr, "rounds": rounds,
               "arms": summarize(runs, steps, batch_size * num_generations), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


def summarize(runs: dict[str, list[dict]], steps: int, completions: int) -> dict:
    """Medians over rounds, and ratios to TRL's; ``completions`` per step."""
    arms = {}
    for name, rs in runs.items():
        rate = statistics.median(completions * sum(r["lengths"])
                                 / sum(x for x in r["rollout_seconds"] if x) for r in rs)
        per_step = statistics.median(r["seconds"] / steps for r in rs)
        rollout = statistics.median(sum(x for x in r["rollout_seconds"] if x) / steps
                                    for r in rs)
        arms[name] = {"seconds_per_step": per_step, "rollout_seconds_per_step": rollout,
                      "other_seconds_per_step": per_step - rollout,
                      "rollout_tokens_per_second": rate,
                      "steps_per_hour": 3600 / per_step,
                      "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in rs),
                      "reward_first_3": statistics.mean(
                          statistics.mean(r["rewards"][:3]) for r in rs),
                      "reward_last_3": statistics.mean(
                          statistics.mean(r["rewards"][-3:]) for r in rs),
                      "layout": rs[0].get("layout")}
    for a in arms.values():
        a["speed_vs_trl"] = arms[PEER]["seconds_per_step"] / a["seconds_per_step"]
        a["memory_vs_trl"] = a["peak_memory_bytes"] / arms[PEER]["peak_memory_bytes"]
    return arms


def format_table(results: dict) -> str:
    """The arms side by side (markdown), then each arm's reward curve (first round)."""
    c = results["cpu"]
    lines = [f"GRPO on {results['problems']}: {results['prompts_per_step']} prompts x "
             f"{results['num_generations']} completions of <= "
             f"{results['max_completion_length']} tokens per step, {results['steps']} steps, "
             f"LoRA r16, fp32, {results['rounds']} alternating rounds (medians); "
             f"{c.get('model')} ({', '.join(c.get('flags', []))}), {c.get('cores')} cores", "",
             "| arm | s/step | sampling s/step | rest s/step | sampling tokens/s | steps/h "
             "| vs TRL | peak memory | vs TRL | reward, first 3 -> last 3 steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in results["arms"].items():
        lines.append(f"| {name} | {a['seconds_per_step']:.1f} | "
                     f"{a['rollout_seconds_per_step']:.1f} | {a['other_seconds_per_step']:.1f} | "
                     f"{a['rollout_tokens_per_second']:.0f} | {a['steps_per_hour']:.0f} | "
                     f"**{a['speed_vs_trl']:.2f}x** | {a['peak_memory_bytes'] / 2**30:.2f} GiB | "
                     f"{a['memory_vs_trl']:.2f}x | {a['reward_first_3']:.2f} -> "
                     f"{a['reward_last_3']:.2f} |")
    lines.append("")
    for name, rs in results["runs"].items():
        for i, r in enumerate(rs):
            lines.append(f"{name} round {i + 1} rewards: "
                         + " ".join(f"{x:.2f}" for x in r["rewards"]))
    return "\n".join(lines)
