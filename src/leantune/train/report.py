"""Plots written into a run's ``report/`` at the end of training (with matplotlib, the
``plot`` extra; without it, none): the LR schedule as planned and as logged, and the loss
of every held-out set against optimizer steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from leantune.train.schedule import Schedule

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plots(run_dir: Path, schedule: Schedule, peak_lr: float) -> list[Path]:
    """``report/lr.png`` and ``report/eval_loss.png``; the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots in report/ (pip install 'leantune[plot]')")
        return []
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    records = read_metrics(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(schedule.total), [peak_lr * m for m in schedule.values()], label="schedule",
            color="0.6")
    logged = [(r["step"] - 1, r["lr"]) for r in records if "lr" in r]
    if logged:
        ax.plot(*zip(*logged), ".", ms=3, label="used")
    ax.set(xlabel="optimizer step (0-based)", ylabel="learning rate",
           title=f"LR schedule: {schedule.kind}" + (
               f", annealed from step {schedule.anneal_at}" if schedule.anneal_at is not None
               else ""))
    ax.legend()
    written.append(_save(plt, fig, out / "lr.png"))

    evals = [r for r in records if "eval_loss" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for name in sorted({n for r in evals for n in r["eval_sets"]}):
            points = [(r["step"], r["eval_sets"][name]["loss"]) for r in evals
                      if name in r["eval_sets"]]
            ax.plot(*zip(*points), marker="o", ms=3, label=name)
        ax.set(xlabel="optimizer step", ylabel="held-out loss (nats/token)",
               title="held-out loss per data set")
        ax.legend()
        written.append(_save(plt, fig, out / "eval_loss.png"))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
