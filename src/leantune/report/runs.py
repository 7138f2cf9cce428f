"""A run directory read back for the report: its ``metrics.jsonl`` split by kind of line,
``summary.json`` (absent while the run is going or if it crashed), ``config.yaml``.

Every line of ``metrics.jsonl`` carries ``step``; besides it:
- a training step: ``loss``, ``lr``, ``grad_norm``, ``train_flops``, ``ff_flops``,
  ``tokens_per_second``, ``padding_fraction``, ``peak_memory_bytes`` (running figures
  since the start of the run);
- a held-out evaluation: ``tag`` (before | periodic | after), ``eval_loss``,
  ``eval_sets`` {name: {loss, perplexity, target_tokens}};
- a Fast Forward stage: ``tag: fast_forward``, ``ff_accepted``, ``ff_loss_before``,
  ``ff_loss_after``, ``ff_evaluations``, ``ff_flops`` (the stage's), ``ff_seconds``;

and every kind its place on the x-axes: ``tokens``, ``flops`` (steps + Fast Forward so
far) and ``compute_seconds``. Logs written before those were added are read too: an
evaluation's place is then interpolated between the neighbouring training steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from leantune.train.schedule import Schedule

# The report's x-axes: the key each is read from on a training-step line, and its label.
AXES = {"step": ("step", "optimizer step"),
        "tokens": ("tokens", "tokens trained on"),
        "flops": ("flops", "FLOPs (steps + Fast Forward)"),
        "seconds": ("compute_seconds", "seconds (steps + Fast Forward)")}


class ReportError(ValueError):
    """A directory that is not a run directory (no ``metrics.jsonl``), or a broken one."""


@dataclass
class RunLog:
    """One run as the report sees it."""

    name: str
    path: Path
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    ff: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)  # eval.tasks' accuracy records
    summary: dict | None = None
    config: dict = field(default_factory=dict)
    evaluation: dict | None = None  # eval.json, written by `leantune eval RUN_DIR`

    @property
    def schedule(self) -> Schedule | None:
        """The planned schedule (from ``summary.json``), or None before the run ended."""
        if not self.summary or "schedule" not in self.summary:
            return None
        return Schedule(**self.summary["schedule"])

    @property
    def peak_lr(self) -> float | None:
        return (self.config.get("optim") or {}).get("lr")

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a training-step field, skipping lines without it."""
        points = [(r["step"], r[key]) for r in self.steps if r.get(key) is not None]
        if not points:
            return np.array([]), np.array([])
        steps, values = zip(*points)
        return np.array(steps, float), np.array(values, float)

    def position(self, axis: str, records: list[dict]) -> np.ndarray:
        """Each record's place on ``axis`` (a key of :data:`AXES`): read from the record when
        it carries it, else interpolated from the training steps (0 at step 0)."""
        steps = np.array([r["step"] for r in records], float)
        if axis == "step":
            return steps
        xs, ys = self.axis(axis)
        known = np.interp(steps, np.r_[0.0, xs], np.r_[0.0, ys]) if len(xs) else steps * np.nan
        own = [_axis_value(r, axis) for r in records]
        return np.array([k if o is None else o for o, k in zip(own, known)], float)

    def axis(self, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, positions on ``axis``, not ``step``) of the training-step lines."""
        points = [(r["step"], v) for r in self.steps if (v := _axis_value(r, axis)) is not None]
        if not points:
            return np.array([]), np.array([])
        steps, values = zip(*points)
        return np.array(steps, float), np.array(values, float)


def _axis_value(record: dict, axis: str) -> float | None:
    if axis == "flops" and "flops" not in record and "loss" in record:
        if record.get("train_flops") is None:  # an older log's training step
            return None
        return record["train_flops"] + (record.get("ff_flops") or 0)
    if axis == "seconds" and "compute_seconds" not in record:
        return record.get("elapsed_seconds")  # older logs: wall clock since the start
    return record.get(AXES[axis][0])


def load_run(path: str | Path, name: str | None = None) -> RunLog:
    """Read a run directory; raises :class:`ReportError` naming what is missing or broken."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path} is not a run directory: it has no metrics.jsonl")
    run = RunLog(name=name or path.resolve().name, path=path)
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # a line cut short by a crash mid-write: the run up to it is whole
            raise ReportError(f"{metrics}:{number}: not JSON ({e.msg})") from None
        if record.get("tag") == "fast_forward":
            run.ff.append(record)
        elif record.get("tag") == "tasks":
            run.tasks.append(record)
        elif "eval_sets" in record:
            run.evals.append(record)
        elif "loss" in record:
            run.steps.append(record)
    for file, attr, parse in (("summary.json", "summary", json.loads),
                              ("config.yaml", "config", yaml.safe_load),
                              ("eval.json", "evaluation", json.loads)):
        if (path / file).is_file():
            try:
                setattr(run, attr, parse((path / file).read_text()) or getattr(run, attr))
            except (ValueError, yaml.YAMLError) as e:
                raise ReportError(f"{path / file}: cannot be read ({e})") from None
    return run


def load_runs(paths: list[str | Path]) -> list[RunLog]:
    """Several runs; two with the same directory name are told apart by their paths."""
    names = [Path(p).resolve().name for p in paths]
    return [load_run(p, str(p) if names.count(n) > 1 else n) for p, n in zip(paths, names)]
