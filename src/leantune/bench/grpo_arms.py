"""One arm of ``leantune bench grpo``, run in a fresh interpreter (so its peak resident
memory is its own): ``python -m leantune.bench.grpo_arms SPEC OUT``.

- ``trl``: TRL's ``GRPOTrainer`` (LoRA through ``peft_config``, its own ``generate``
  rollouts, the same reward function), the prompts in the order given, sequentially.
- ``leantune``: ``leantune train`` in-process with ``objective.kind=grpo``, the same
  prompts in the same order (a file written in that order, taken sequentially: one
  epoch's seeded shuffle is undone by :func:`leantune_order`).

Both report per-step rewards, seconds split into sampling and the rest, completion
tokens, and ``ru_maxrss``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from leantune.bench.preference_arms import leantune_overrides, peak_rss, trl_start


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from leantune.objectives.rewards import load_reward

    tokenizer, model, rows, peft = trl_start(spec)
    name, reward = load_reward(spec["reward"])
    reward.__name__ = name
    ticks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ticks.append(time.perf_counter())

    g = spec["num_generations"]
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"] * g,
            num_generations=g, max_completion_length=spec["max_completion_length"],
            temperature=1.0, beta=0.0, loss_type="dapo", scale_rewards="group",
            max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"],
            use_cpu=not torch.cuda.is_available(), bf16=False, dataloader_num_workers=0,
            max_grad_norm=1.0, weight_decay=0.0, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=peft, callbacks=[Clock()])
        generate: list[float] = []
        sampler = trainer._generate_single_turn  # TRL's sampling, rewards not included

        def timed(*a, **kw):
            tick = time.perf_counter()
            try:
                return sampler(*a, **kw)
            finally:
                generate.append(time.perf_counter() - tick)

        trainer._generate_single_turn = timed
        start = time.perf_counter()
        out = trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"seconds": out.metrics["train_runtime"],
            "step_seconds": [b - a for a, b in zip([start] + ticks, ticks)],
            "rewards": [h["reward"] for h in logs],
            "lengths": [h.get("completions/mean_length") for h in logs],
            "rollout_seconds": generate, "peak_memory_bytes": peak_rss(),
            "optimizer_steps": out.global_step, "keys": sorted(logs[0]) if logs else []}


def run_leantune(spec: dict) -> dict:
    import leantune.train.loop as loop
    from leantune.config import load_config

    g = spec["num_generations"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        over = leantune_overrides(spec | {"objective": "grpo", "extra": [
            f"objective.num_generations={g}",
            f"objective.max_completion_length={spec['max_completion_length']}",
            f"objective.rewards=[{spec['reward']}]", "objective.beta=0.0",
            "schedule.kind=constant", "data.eval_fraction=0", "eval.before=false",
            "train.log_every=1", *spec.get("extra", [])]}, run_dir)
        summary = loop.train(load_config(None, over))
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r and "tag" not in r]
    rollout = [b["rollout_seconds"] - a for a, b in zip(
        [0.0] + [r["rollout_seconds"] for r in steps], steps)]
    seconds = summary["train_seconds"] + summary["grpo"]["rollout_seconds"]
    return {"seconds": seconds, "rewards": [r["reward"] for r in steps],
            "lengths": [r["completions/mean_length"] for r in steps],
            "rollout_seconds": rollout, "peak_memory_bytes": peak_rss(),
            "optimizer_steps": summary["optimizer_steps"],
            "rollout_tokens": summary["grpo"]["rollout_tokens"],
            "layout": summary["packing"].get("rollouts", {}).get("layout")}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run = {"trl": run_trl, "leantune": run_leantune}[spec["impl"]]
    Path(out_path).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
