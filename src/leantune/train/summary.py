"""``summary.json``: the figures of a run that the README's run-directory table lists."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from leantune.eval.loss import positions
from leantune.model.mfu import mfu_text
from leantune.train.build import Run
from leantune.train.metrics import peak_memory_bytes
from leantune.train.preference import reference_mode


def build_summary(run: Run, after: dict | None, prompts, replies_before: list[str],
                  replies_after: list[str]) -> dict:
    """The run's figures; ``after`` is the main held-out set's final eval."""
    state, (trainable, total), mem = run.state, run.params, run.train_memory
    peak = max(peak_memory_bytes(), mem.peak, mem.prior_peak) if mem else peak_memory_bytes()
    summary = {
        "method": run.cfg.adapter.method,
        "model": run.cfg.model.name_or_path,
        "train_tokens": {"target": state.target_tokens, "total": state.real_tokens},
        "optimizer_steps": state.step,
        "train_flops": state.train_flops,
        "eval_flops": state.eval_flops,
        "ff_flops": state.ff_flops,
        "ff_stages": state.ff_stages,
        "ff_steps_accepted": state.ff_steps_accepted,
        "ff_accepted_per_stage": state.ff_accepted_per_stage,
        "ff_seconds": state.ff_seconds,
        "wall_seconds": time.time() - run.started,
        "train_seconds": state.train_seconds,
        "tokens_per_second": state.tokens_per_second,
        "precision": run.precision.to_dict(),
        "compile": run.compile,
        "mfu": mfu_record(run),
        "chunked_loss": run.loss_paths["chunked_loss"],
        "head_at_targets": run.loss_paths["head_at_targets"],
        # What Accelerate runs (type, processes, FSDP sharding) beside what the launch asked.
        "strategy": run.strategy,
        # Two meters (rusage and sampled /proc) differ by a few pages: report the larger.
        "peak_memory_bytes": peak,
        # Every process's peak, by rank (a gather: each process builds the summary). What
        # FSDP saves shows here: each process holds its shard.
        "peak_memory_bytes_per_process": [int(x) for x in run.acc.gather(
            torch.tensor([peak], device=run.acc.device)).tolist()],
        # Memory at the first step and the peak during training (CUDA allocated, else
        # resident): their difference is what training itself added (activations,
        # gradients, optimizer state), apart from loading model and data.
        "train_memory_bytes": {"at_start": mem.base, "peak": mem.peak} if mem else None,
        "trainable_params": trainable,
        "total_params": total,
        "base_memory_bytes": run.base_memory,
        "eval_loss": {"before": state.eval_loss_before, "after": after and after["loss"]},
        "eval_sets": eval_table(run),
        "eval_history": state.eval_history,
        "task_accuracy": {r["when"]: r for r in state.task_history
                          if r["when"] in ("before", "after")} or None,
        "task_curve": task_curve(state.task_history),
        "final_train_loss": state.last_loss,
        "nonfinite_skipped": len(state.nonfinite_steps),
        "nonfinite_steps": state.nonfinite_steps,
        "padding_fraction": state.padding_fraction,
        "packing": run.packing,
        "rows": state.rows,
        "examples": state.examples,
        "data": run.data.stats | {"mode": run.cfg.data.mode},
        "start": run.start.to_dict(),
        "schedule": asdict(run.schedule),
        "samples": [{"prompt": p, "reference": ref, "after": a,
                     "before": replies_before[i] if replies_before else None}
                    for i, ((p, ref, _), a) in enumerate(zip(prompts, replies_after))],
    }
    if run.data.feed is not None:
        summary["replay"] = replay_summary(run)
    summary["objective"] = objective_summary(run)
    if run.data.rollouts is not None:
        summary["grpo"] = grpo_summary(run)
    return summary


def grpo_summary(run: Run) -> dict:
    """GRPO's sampling cost beside training's, tied groups, and the held-out rewards
    (greedy completions) before and after."""
    state, o = run.state, run.cfg.objective
    by_tag = {r["tag"]: {k.removeprefix("eval_"): v for k, v in r.items()
                         if k.startswith("eval_") and v is not None and k != "eval_sets"}
              for r in state.eval_history}
    return {"num_generations": o.num_generations, "loss_type": o.loss_type, "beta": o.beta or 0.0,
            "rewards": list(o.rewards), "reference": reference_mode(run.cfg, run.adapter),
            "rollout_seconds": state.rollout_seconds, "rollout_tokens": state.rollout_tokens,
            "rollout_tokens_per_second": state.rollout_tokens / state.rollout_seconds
            if state.rollout_seconds else None,
            "rollout_flops": state.rollout_flops,
            "rollout_share_of_seconds": state.rollout_seconds
            / (state.rollout_seconds + state.train_seconds)
            if state.rollout_seconds + state.train_seconds else None,
            "groups": state.groups, "tied_groups": state.tied_groups,
            "held_out": {tag: by_tag.get(tag) for tag in ("before", "after")}}


def grpo_lines(g: dict | None) -> list[str]:
    """A GRPO run's held-out reward before -> after and where its time went."""
    if not g:
        return []
    held = g["held_out"]
    lines = []
    if held.get("after"):
        before, after = held.get("before") or {}, held["after"]
        for key in sorted(k for k in after if k.startswith("rewards/")):
            name = key.split("/")[1]
            lines.append(f"held-out {name} (greedy): {before.get(key, float('nan')):.3f} -> "
                         f"{after[key]:.3f}")
    rate = g["rollout_tokens_per_second"]
    lines.append(f"rollouts: {g['rollout_tokens']:,} completion tokens in "
                 f"{g['rollout_seconds']:.0f} s ({rate or 0:.1f} tokens/s, "
                 f"{100 * (g['rollout_share_of_seconds'] or 0):.0f} % of the step time); "
                 f"{g['tied_groups']} of {g['groups']} groups tied")
    return lines


def objective_summary(run: Run) -> dict:
    """What the objective was and (a preference run) its figures: the last logged training
    ones, the main held-out set's before and after, and the reference's share of the
    training FLOPs."""
    o, state = run.cfg.objective, run.state
    if o.kind == "sft":
        return {"kind": "sft"}
    main = run.data.eval_sets[0].name if run.data.eval_sets else None
    by_tag = {r["tag"]: r["eval_sets"].get(main) for r in state.eval_history}
    keep = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
            "rewards/rejected", "logps/accuracies", "logps/chosen", "logps/rejected", "kl")
    return {"kind": o.kind, "knobs": getattr(run.objective, "knobs", {}),
            "reference": reference_mode(run.cfg, run.adapter),
            "layout": run.packing.get("pairs"),
            "reference_flops": state.reference_flops,
            "reference_share": state.reference_flops / state.train_flops
            if state.train_flops else None,
            "train": run.figures,
            "held_out": {tag: {k: v for k, v in (by_tag.get(tag) or {}).items() if k in keep}
                         or None for tag in ("before", "after")}}


def mfu_record(run: Run) -> dict:
    """Achieved training FLOP/s (the FLOPs ledger over the seconds of the optimizer steps)
    and its fraction of the measured matmul peak in the run's compute dtype."""
    state, p = run.state, run.precision
    achieved = state.train_flops / state.train_seconds if state.train_seconds > 0 else None
    return {"achieved_flops_per_second": achieved, "peak_flops_per_second": p.peak_flops,
            "fraction": achieved / p.peak_flops if achieved and p.peak_flops else None,
            "compute_dtype": str(p.compute_dtype).removeprefix("torch."),
            "peak_method": p.peak_method}


def eval_table(run: Run) -> dict[str, dict]:
    """Loss and perplexity of every held-out set before and after training, so forgetting
    (old data) and adaptation (new data) read side by side."""
    table = {}
    for s in run.data.eval_sets:
        by_tag = {r["tag"]: r["eval_sets"][s.name] for r in run.state.eval_history
                  if s.name in r["eval_sets"]}
        table[s.name] = {"role": s.role, "examples": len(s.examples),
                         "tokens": sum(map(positions, s.examples)),
                         "before": by_tag.get("before"), "after": by_tag.get("after")}
    return table


def replay_summary(run: Run) -> dict:
    """Windows and tokens each stream gave, and the replayed fraction they make."""
    windows = run.state.windows
    length = run.cfg.data.max_length
    total = sum(windows.values())
    r = run.cfg.data.replay
    return {"path": r.path, "ratio": r.ratio, "schedule": r.schedule,
            "final_ratio": r.final_ratio, "windows": dict(windows),
            "tokens": {k: v * length for k, v in windows.items()},
            "fraction": windows.get("replay", 0) / total if total else 0.0}


def _loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _acc(r: dict | None) -> str:
    return "n/a" if r is None else (f"{100 * r['acc']:.1f} [{100 * r['acc_ci'][0]:.1f}, "
                                    f"{100 * r['acc_ci'][1]:.1f}]")


def task_curve(history: list[dict]) -> list[dict] | None:
    """Every scoring of ``eval.tasks`` in step order (before, periodic, after): the step,
    each task's ``acc`` and the macro ``acc`` / ``acc_norm``; None when there was none."""
    return [{"step": r["step"], "when": r["when"], "macro_acc": r["macro"]["acc"],
             "macro_acc_norm": r["macro"]["acc_norm"],
             "tasks": {name: t["acc"] for name, t in r["tasks"].items()}}
            for r in history] or None


def task_lines(accuracy: dict | None) -> list[str]:
    """``eval.tasks``' accuracy before -> after, one task per line, then the macro."""
    if not accuracy or "after" not in accuracy:
        return []
    before, after = accuracy.get("before") or {}, accuracy["after"]
    lines = ["task accuracy (acc % [95 % interval]):"]
    for name, r in after["tasks"].items():
        lines.append(f"  {name}: {_acc(before.get('tasks', {}).get(name))} -> {_acc(r)}")
    lines.append(f"  macro: {_acc(before.get('macro'))} -> {_acc(after['macro'])}")
    return lines


def pair_lines(objective: dict | None) -> list[str]:
    """A preference run's held-out pairs, before -> after."""
    held = (objective or {}).get("held_out") or {}
    if not held.get("after"):
        return []
    before, after = held.get("before") or {}, held["after"]

    def pct(d: dict, key: str) -> str:
        return f"{100 * d[key]:.1f} %" if key in d else "-"

    lines = [f"held-out pairs ({objective['kind']}): chosen ranked first (log-prob) "
             f"{pct(before, 'logps/accuracies')} -> {pct(after, 'logps/accuracies')}"]
    if "rewards/margins" in after and objective.get("reference"):
        lines.append(f"  reward accuracy {pct(before, 'rewards/accuracies')} -> "
                     f"{pct(after, 'rewards/accuracies')}, reward margin "
                     f"{before.get('rewards/margins', float('nan')):.3f} -> "
                     f"{after['rewards/margins']:.3f}")
    if objective.get("reference") and objective.get("reference_share") is not None:
        lines.append(f"  reference ({objective['reference']}): "
                     f"{100 * objective['reference_share']:.1f} % of the training FLOPs; "
                     f"layout {(objective.get('layout') or {}).get('layout', 'padded')}")
    return lines


def summary_text(s: dict, run_dir: str) -> str:
    """What ``leantune train`` prints at the end: where the run is and its headline figures."""
    lines = [f"\nrun directory: {run_dir}"]
    if "grpo" not in s:  # a GRPO run's held-out set is prompts: rewards, below
        lines.append(f"held-out loss: before {_loss(s['eval_loss']['before'])} -> after "
                     f"{_loss(s['eval_loss']['after'])}")
    if len(s["eval_sets"]) > 1:
        for name, row in s["eval_sets"].items():
            before, after = (row[k] and row[k]["loss"] for k in ("before", "after"))
            lines.append(f"  {name} ({row['role']}, {row['tokens']:,} tokens): "
                         f"{_loss(before)} -> {_loss(after)}")
    if "replay" in s and s["replay"]["path"]:
        lines.append(f"replayed: {s['replay']['fraction']:.1%} of the windows "
                     f"({s['replay']['windows']})")
    lines += task_lines(s.get("task_accuracy"))
    lines += pair_lines(s.get("objective"))
    lines += grpo_lines(s.get("grpo"))
    lines.append(f"parameters: {s['trainable_params']:,} trainable / {s['total_params']:,} "
                 f"total ({100 * s['trainable_params'] / s['total_params']:.3f} %)")
    lines.append(f"throughput: {s['tokens_per_second']:.1f} tokens/s over "
                 f"{s['optimizer_steps']} steps ({s['train_tokens']['total']:,} tokens, padding "
                 f"{100 * s['padding_fraction']:.1f} %), wall {s['wall_seconds']:.0f} s, peak "
                 f"memory {s['peak_memory_bytes'] / 2**30:.2f} GiB")
    if (mfu := mfu_text(s.get("mfu"))) is not None:
        lines.append(f"precision {s['precision']['used']} ({s['precision']['reason']}); "
                     f"MFU {mfu}")
    for sample in s["samples"]:
        lines += [f"\nheld-out prompt:\n{sample['prompt'].strip()}",
                  f"\nreply before training:\n{sample['before']}",
                  f"\nreply after training:\n{sample['after']}"]
    page = Path(run_dir) / "report" / "index.html"
    if page.is_file():
        lines.append(f"\nreport: {page} (open it in a browser)")
    return "\n".join(lines)
