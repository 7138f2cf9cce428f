"""The report's figures, drawn headless with matplotlib (the ``plot`` extra). Every figure
overlays all the runs given, one colour per run, so several runs compare at a glance.

Each ``*_figure(runs)`` returns a matplotlib Figure, or None when no run logged what it
shows (no Fast Forward stage, say); :func:`write_plots` saves them as PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leantune.report.runs import AXES, RunLog


@dataclass
class Plot:
    """A saved figure: its file, and the title and caption the page shows with it."""

    path: Path
    title: str
    caption: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    return plt


def colour(i: int) -> str:
    return f"C{i % 10}"


def _style(ax, legend: bool = True, **labels) -> None:
    """Labels, a light grid and (optionally) a small legend: every panel looks alike."""
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def loss_figure(runs: list[RunLog]):
    """Training loss (line) and main held-out loss (dots) against steps, tokens, FLOPs and
    seconds: the same curves, with cost on the x-axis."""
    if not any(r.steps for r in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for ax, axis in zip(axes.flat, AXES):
        for i, run in enumerate(runs):
            trained = [r for r in run.steps if r.get("loss") is not None]
            ax.plot(run.position(axis, trained), [r["loss"] for r in trained], color=colour(i),
                    lw=1, alpha=0.8, label=f"{run.name} train")
            evals = [e for e in run.evals if e.get("eval_loss") is not None]
            if evals:
                ax.plot(run.position(axis, evals), [e["eval_loss"] for e in evals], "o--",
                        color=colour(i), ms=4, lw=0.8, label=f"{run.name} held-out")
        _style(ax, legend=False, xlabel=AXES[axis][1], ylabel="loss (nats/token)")
        if axis in ("flops", "tokens"):
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("training and held-out loss against steps, tokens, compute and time")
    return fig


def eval_sets_figure(runs: list[RunLog]):
    """Held-out loss of every data set against steps: in continual pre-training, the old
    corpus (forgetting) beside the new one (adaptation)."""
    if not any(r.evals for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        names = sorted({n for e in run.evals for n in e["eval_sets"]})
        for j, name in enumerate(names):
            points = [(e["step"], e["eval_sets"][name]["loss"]) for e in run.evals
                      if name in e["eval_sets"] and e["eval_sets"][name]["loss"] is not None]
            if points:
                ax.plot(*zip(*points), styles[j % len(styles)], marker="o", ms=3,
                        color=colour(i), label=f"{run.name}: {name}")
    _style(ax, xlabel="optimizer step", ylabel="held-out loss (nats/token)",
           title="held-out loss per data set")
    return fig


def lr_figure(runs: list[RunLog]):
    """The LR schedule as planned (line) and as used (dots), Fast Forward stages marked."""
    if not any(r.steps for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, run in enumerate(runs):
        schedule, peak = run.schedule, run.peak_lr
        if schedule is not None and peak is not None:
            # lr(step) is the LR of the step about to be taken; it is logged after it.
            ax.plot(range(1, schedule.total + 1), [peak * m for m in schedule.values()],
                    color=colour(i), lw=1, alpha=0.5, label=f"{run.name} planned ({schedule.kind})")
        steps, lrs = run.series("lr")
        ax.plot(steps, lrs, ".", color=colour(i), ms=4, label=f"{run.name} used")
        for stage in run.ff:
            ax.axvline(stage["step"], color=colour(i), lw=0.6, ls=":", alpha=0.7)
    _style(ax, xlabel="optimizer step", ylabel="learning rate",
           title="learning-rate schedule (dotted lines: Fast Forward stages)")
    return fig


def fast_forward_figure(runs: list[RunLog]):
    """Where Fast Forward fired, how many steps each stage accepted, and the FF-set loss
    before and after each stage."""
    if not any(r.ff for r in runs):
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.2), sharex=True)
    n = sum(1 for r in runs if r.ff)
    width = 0.8 / n
    for k, (i, run) in enumerate((i, r) for i, r in enumerate(runs) if r.ff):
        steps = [s["step"] + (k - (n - 1) / 2) * width for s in run.ff]  # side by side
        top.bar(steps, [s["ff_accepted"] for s in run.ff], width=width, color=colour(i),
                label=run.name)
        for s in run.ff:
            bottom.plot([s["step"], s["step"]], [s["ff_loss_before"], s["ff_loss_after"]],
                        color=colour(i), lw=2)
        bottom.plot([s["step"] for s in run.ff], [s["ff_loss_after"] for s in run.ff], "v",
                    color=colour(i), ms=5)
    _style(top, ylabel="steps accepted", title="Fast Forward stages")
    _style(bottom, legend=False, xlabel="optimizer step the stage followed",
           ylabel="FF-set loss (before → ▼ after)")
    return fig


def tasks_figure(runs: list[RunLog]):
    """``eval.tasks``' accuracy against optimizer steps (``eval.tasks_every``): each task
    thin, the macro average thick, one colour per run."""
    if not any(len(r.tasks) > 1 for r in runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ["--", ":", "-.", (0, (1, 3))]
    for i, run in enumerate(r for r in runs if len(r.tasks) > 1):
        steps = [t["step"] for t in run.tasks]
        ax.plot(steps, [100 * t["macro"]["acc"] for t in run.tasks], "o-", color=colour(i),
                lw=2, ms=4, label=f"{run.name}: macro")
        for j, name in enumerate(run.tasks[-1]["tasks"]):
            ax.plot(steps, [100 * t["tasks"][name]["acc"] if name in t["tasks"] else np.nan
                            for t in run.tasks], ls=styles[j % len(styles)], color=colour(i),
                    lw=0.8, label=f"{run.name}: {name}")
    _style(ax, xlabel="optimizer step", ylabel="accuracy (%)", title="task accuracy")
    return fig


def preference_figure(runs: list[RunLog]):
    """A preference run's figures with TRL's names against steps: the reward margin and
    accuracy, the chosen and rejected log-probs (training: lines; held-out: dots)."""
    panels = [("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"),
              ("logps/chosen", "log-prob: chosen (—) / rejected (- -)")]
    if not any(run.series("rewards/margins")[0].size for run in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, panels):
        for i, run in enumerate(runs):
            keys = [key, "logps/rejected"] if key == "logps/chosen" else [key]
            for k, style in zip(keys, ("-", "--")):
                steps, values = run.series(k)
                ax.plot(steps, values, ls=style, color=colour(i), lw=1,
                        label=run.name if style == "-" else None)
                held = [(e["step"], e[f"eval_{k}"]) for e in run.evals if f"eval_{k}" in e]
                if held:
                    ax.plot(*zip(*held), "o", color=colour(i), ms=4)
        _style(ax, legend=False, xlabel="optimizer step", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle("preference pairs: training (lines) and held-out (dots)")
    return fig


def grpo_figure(runs: list[RunLog]):
    """A GRPO run's figures with TRL's names against steps: the reward (sampled groups:
    lines; greedy answers to held-out prompts: dots), the fraction of tied groups, and
    the completions' mean length."""
    panels = [("reward", "reward"), ("frac_reward_zero_std", "tied groups (fraction)"),
              ("completions/mean_length", "completion length (tokens)")]
    if not any(run.series("reward")[0].size for run in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, panels):
        for i, run in enumerate(runs):
            ax.plot(*run.series(key), color=colour(i), lw=1, label=run.name)
            held = [(e["step"], e[f"eval_{key}"]) for e in run.evals if f"eval_{key}" in e]
            if held:
                ax.plot(*zip(*held), "o", color=colour(i), ms=4)
        _style(ax, legend=False, xlabel="optimizer step", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle("GRPO: sampled groups (lines) and held-out greedy answers (dots)")
    return fig


def system_figure(runs: list[RunLog]):
    """Tokens/s, padding fraction, peak memory and gradient norm against steps."""
    panels = [("tokens_per_second", "tokens/s (running)", 1),
              ("padding_fraction", "padding fraction (running)", 1),
              ("peak_memory_bytes", "peak memory (GiB)", 2**-30),
              ("grad_norm", "gradient norm (before clipping)", 1)]
    if not any(run.series(key)[0].size for run in runs for key, _, _ in panels):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            ax.plot(steps, values * scale, color=colour(i), lw=1, label=run.name)
        if not ax.lines or not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center",
                    transform=ax.transAxes, color="0.5")
        _style(ax, legend=False, ylabel=label)
    for ax in axes[1]:
        ax.set(xlabel="optimizer step")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("throughput, padding, memory and gradient norm")
    return fig


FIGURES = [
    ("loss.png", "Loss", loss_figure,
     "Training loss (lines) and the main held-out loss (dots) against optimizer steps, "
     "tokens, FLOPs and seconds spent in steps and Fast Forward."),
    ("eval_sets.png", "Held-out loss per data set", eval_sets_figure,
     "Every held-out set, one line style each: the replay or old corpus shows forgetting, "
     "the new data shows adaptation."),
    ("lr.png", "Learning-rate schedule", lr_figure,
     "The schedule as planned (line) and the LR each step used (dots)."),
    ("fast_forward.png", "Fast Forward", fast_forward_figure,
     "Steps each stage accepted (bars) and the FF-set loss before and after it."),
    ("tasks.png", "Task accuracy", tasks_figure,
     "eval.tasks' accuracy at every scoring (eval.tasks_every): each task thin, the macro "
     "average thick."),
    ("preference.png", "Preference pairs", preference_figure,
     "TRL's figures: the reward margin and accuracy (β times the log-ratio to the "
     "reference; SimPO/ORPO: β times the per-token log-prob), and the chosen and rejected "
     "completions' log-probs, over training steps (lines) and on held-out pairs (dots)."),
    ("grpo.png", "GRPO rewards", grpo_figure,
     "TRL's figures: the mean reward of each step's sampled completions (lines) and of "
     "greedy answers to held-out prompts (dots), the fraction of groups whose rewards all "
     "tie (no gradient), and the completions' mean length."),
    ("system.png", "Throughput, padding, memory", system_figure,
     "Running tokens/s and padding fraction since the start, the process's peak memory "
     "(CUDA allocated on GPU, resident set on CPU), and the gradient norm."),
]


def write_plots(runs: list[RunLog], out_dir: Path) -> list[Plot]:
    """Draw every figure some run has data for into ``out_dir``; returns what was saved."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, title, draw, caption in FIGURES:
        fig = draw(runs)
        if fig is None:
            (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report
            continue
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        saved.append(Plot(out_dir / name, title, caption))
    return saved
