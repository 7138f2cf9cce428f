"""The run directory contract (README, "The run directory"): ``config.yaml`` (resolved), ``metrics.jsonl``,
``summary.json``, ``checkpoints/step-N/``, ``adapter/``, ``report/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from leantune.config import Config


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked; nothing was written to it."""


def prepare_run_dir(cfg: Config, acc: Accelerator) -> Path:
    """Create (or reopen, on resume) the run directory and write the resolved config.

    Raises:
        RunDirError: the directory holds an earlier run and ``train.resume`` is false, or
            it is not writable. Checked before any training, so nothing is lost.
    """
    run_dir = Path(cfg.train.output_dir)
    if acc.is_main_process:
        earlier = [n for n in ("metrics.jsonl", "checkpoints", "adapter") if (run_dir / n).exists()]
        if earlier and not cfg.train.resume:
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(earlier)}); set "
                              "train.resume=true to continue it or choose another "
                              "train.output_dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"train.output_dir {run_dir} is not writable: {e}") from None
        cfg.save(run_dir / "config.yaml")
    acc.wait_for_everyone()
    return run_dir


def output_bytes(trainable: int, stored: int, keep_last_n: int, periodic: bool) -> int:
    """Disk a run's checkpoints and final output need at most, estimated.

    A checkpoint holds the ``stored`` weights (the adapter's trainable ones, or the whole
    model) and AdamW's two fp32 moments per trainable weight; ``keep_last_n`` of them stay,
    one more is being written beside them, and the final output is one more copy of the
    weights. ``stored`` is in bytes; ``trainable`` in elements.
    """
    checkpoint = stored + 2 * 4 * trainable
    kept = keep_last_n + 1 if periodic else 1
    return kept * checkpoint + stored


def check_free_space(run_dir: Path, needed: int) -> None:
    """Refuse a run whose checkpoints would not fit, before any training.

    Raises:
        RunDirError: less than ``needed`` bytes free under ``run_dir``.
    """
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise RunDirError(
            f"train.output_dir {run_dir}: {free / 2**30:.2f} GiB free, but its checkpoints and "
            f"final weights need about {needed / 2**30:.2f} GiB; free some space, lower "
            "checkpoint.keep_last_n or choose another train.output_dir")
