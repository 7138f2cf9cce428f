"""The run directory's logs: ``metrics.jsonl`` (one JSON object per logged step) and
``summary.json`` (final figures), written by the main process only.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from leantune.common.files import jsonable
from leantune.objectives.base import Tally


class MetricsLog:
    """Appends to ``metrics.jsonl``; on resume, drops lines past the checkpoint's step so
    the file reads as one uninterrupted run. Without a checkpoint to resume from
    (``resume_step=None``) the run starts over, so an earlier partial log is dropped.

    With ``tracker`` (an Accelerator with trackers started), each line is also logged
    there as scalars (:func:`leantune.train.trackers.scalars`) at its step.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None,
                 tracker=None):
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if enabled and path.exists():
            kept = [] if resume_step is None else [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(jsonable(record)) + "\n")
        if self.tracker is not None:  # Accelerate logs on the main process only
            from leantune.train.trackers import scalars

            self.tracker.log(scalars(record), step=record["step"])


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on CUDA, else this process's peak resident set.

    On Linux the resident peak is ``VmHWM`` from ``/proc/self/status``, which starts
    afresh with the program. ``ru_maxrss`` does not: it keeps the parent's peak across
    ``fork`` and ``execve``, so a run launched from a large process (a benchmark, a
    notebook) would report that process's memory as its own.
    """
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Memory at entry and its peak until exit: CUDA allocated bytes on GPU, else the
    resident set sampled every ``interval`` seconds by a thread.

    A phase's own cost is ``peak - base``: the process-wide high-water mark
    (``peak_memory_bytes``) only grows, so it cannot tell a phase from what ran before it.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.base, self.prior_peak = interval, 0, 0, 0
        self.cuda = torch.cuda.is_available()
        self._stop = threading.Event()

    def _now(self) -> int:
        return int(torch.cuda.memory_allocated()) if self.cuda else resident_bytes()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = self._now()
        if self.cuda:  # keep the earlier high-water mark for the whole-run figure
            self.prior_peak = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated()))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def all_means(tally: Tally, acc: Accelerator) -> dict[str, float]:
    """An objective's figures averaged over what every process measured (processes may
    hold different figures, or none: objects are gathered, not tensors)."""
    if acc.num_processes > 1:
        merged = type(tally)()
        for part in gather_object([tally]):
            merged.merge(part)
        tally = merged
    return tally.means()
