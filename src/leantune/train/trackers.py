"""Optional experiment trackers (TensorBoard, Weights & Biases) through Accelerate's own
tracker API: ``Accelerator(log_with=...)``, ``init_trackers``, ``log`` and each tracker's
``finish`` (not ``end_training``, which also destroys the process group).
``metrics.jsonl`` stays the record of a run; a tracker gets the same lines as scalars.

Scalar names: ``train/<key>`` for a training step, ``eval/<data set>/<loss|perplexity>``
for a held-out evaluation, ``fast_forward/<key>`` for a Fast Forward stage.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from accelerate.utils import ProjectConfiguration

from leantune.config import Config, ConfigError

# (config flag, Accelerate tracker, the modules any one of which it needs, what to install)
TRACKERS = [("tensorboard", "tensorboard", ("tensorboard", "tensorboardX"),
             "pip install 'leantune[tensorboard]'"),
            ("wandb", "wandb", ("wandb",), "pip install wandb")]


def tracker_names(cfg: Config) -> list[str]:
    """The Accelerate trackers ``cfg.logging`` asks for; a missing package is an error (at
    load, before any training), not a tracker silently dropped as Accelerate would."""
    names = []
    for flag, name, modules, install in TRACKERS:
        if getattr(cfg.logging, flag):
            if not any(importlib.util.find_spec(m) for m in modules):
                raise ConfigError(f"logging.{flag}=true needs the {modules[0]} package: "
                                  f"{install}, or set logging.{flag}=false")
            names.append(name)
    return names


def start_trackers(acc, cfg: Config, resume_step: int | None) -> None:
    """Open the trackers (main process) with the flattened config as hyperparameters. A
    resumed run purges TensorBoard events past its checkpoint, as ``metrics.jsonl`` drops
    those lines, so the curves read as one run."""
    if not acc.log_with:
        return
    kwargs: dict[str, dict] = {"wandb": {"name": Path(cfg.train.output_dir).resolve().name,
                                         "dir": cfg.train.output_dir}}
    if resume_step is not None:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
        kwargs["wandb"]["resume"] = "allow"
    acc.init_trackers(cfg.logging.project, config=hyperparameters(cfg.to_dict()),
                      init_kwargs=kwargs)


def project_configuration(cfg: Config) -> ProjectConfiguration:
    """TensorBoard writes under ``OUTPUT_DIR/tensorboard/<logging.project>``."""
    return ProjectConfiguration(project_dir=cfg.train.output_dir,
                                logging_dir=str(Path(cfg.train.output_dir) / "tensorboard"))


def hyperparameters(config: dict, prefix: str = "") -> dict[str, Any]:
    """``section.key: value`` with values TensorBoard's hparams accept (lists and None as
    text)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= hyperparameters(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat


def scalars(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` line as tracker scalars (finite numbers only)."""
    tag = record.get("tag")
    if tag == "fast_forward":
        values = {f"fast_forward/{k.removeprefix('ff_')}": v for k, v in record.items()}
    elif "eval_sets" in record:
        values = {f"eval/{name}/{k}": r[k] for name, r in record["eval_sets"].items()
                  for k in ("loss", "perplexity")}
    else:
        values = {f"train/{k}": v for k, v in record.items()}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v) and not k.endswith("/step")}
