"""The run directory contract (DESIGN.md): ``config.yaml`` (resolved), ``metrics.jsonl``,
``summary.json``, ``checkpoints/step-N/``, ``adapter/``, ``report/``.
"""

from __future__ import annotations

import os
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
