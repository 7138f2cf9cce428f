"""Where a run starts, and what it takes from an earlier one.

- ``fresh``: the base model (plus a new adapter), step 0.
- ``resume`` (``train.resume`` and a checkpoint in the output dir): everything - weights,
  optimizer, RNG, step, data position - so the run continues as if never stopped.
- ``init`` (``train.init_from``): an earlier run's weights (and optimizer moments unless
  ``optim.reset_on_new_data``) at step 0, with the schedule and the data starting over:
  continual pre-training on a new corpus, re-warmed and re-decayed.
- ``anneal`` (``schedule.anneal_from``): everything from the checkpoint, as for resume,
  but the LR decays from the checkpoint's to the floor over the anneal's steps, in a new
  run directory, so the run it came from stays resumable on its constant phase.

Resuming or annealing onto a corpus whose content key differs from the one a stream was
reading starts that stream at its beginning (new data has arrived), and resets the
optimizer moments when ``optim.reset_on_new_data``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from leantune.adapters import Adapter
from leantune.config import Config, ConfigError
from leantune.train.checkpoint import latest_checkpoint, load_checkpoint
from leantune.train.run_dir import RunDirError
from leantune.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Start:
    kind: str                     # fresh | resume | init | anneal
    checkpoint: Path | None = None
    new_data: list[str] | None = None  # streams whose corpus changed since the checkpoint
    optimizer_reset: bool = False

    def describe(self) -> str:
        verb = {"resume": "resumed from", "init": "initialized from the weights of",
                "anneal": "annealing"}[self.kind]
        extra = f"; new data for {', '.join(self.new_data)}" if self.new_data else ""
        extra += "; optimizer moments reset" if self.optimizer_reset else ""
        return f"{verb} {self.checkpoint}{extra}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "checkpoint": self.checkpoint and str(self.checkpoint),
                "new_data": self.new_data, "optimizer_reset": self.optimizer_reset}


def find_checkpoint(path: str, key: str) -> Path:
    """A checkpoint directory, or a run directory's last complete checkpoint.

    Raises:
        ConfigError: neither (naming ``key``, the option that gave the path).
    """
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise ConfigError(f"{key}: {path} is neither a checkpoint (checkpoints/step-N) nor a "
                          "run directory with one")
    return found


def check_start(cfg: Config) -> None:
    """Refuse, before anything is written, a start point that does not exist or an anneal
    that would write into the run it anneals.

    Raises:
        ConfigError: ``train.init_from`` / ``schedule.anneal_from`` names no checkpoint.
        RunDirError: ``train.output_dir`` is the annealed run's own directory.
    """
    if cfg.train.init_from is not None:
        find_checkpoint(cfg.train.init_from, "train.init_from")
    if cfg.schedule.anneal_from is not None:
        ckpt = find_checkpoint(cfg.schedule.anneal_from, "schedule.anneal_from")
        if ckpt.resolve().parent.parent == Path(cfg.train.output_dir).resolve():
            raise RunDirError("schedule.anneal_from: write the annealed run into another "
                              "train.output_dir, so the run it comes from stays resumable")


def restore(cfg: Config, run_dir: Path, adapter: Adapter, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, data_keys: dict[str, str], acc=None
            ) -> tuple[TrainState, Start]:
    """Load what the run starts from into ``model`` and ``optimizer``; its state.
    ``acc`` restores checkpoints of format ``accelerate`` (all processes call this)."""
    resume_from = latest_checkpoint(run_dir) if cfg.train.resume else None
    if resume_from is not None:
        state = TrainState(**load_checkpoint(resume_from, adapter, model, optimizer, acc=acc))
        start = Start("resume", resume_from)
    elif cfg.schedule.anneal_from is not None:
        ckpt = find_checkpoint(cfg.schedule.anneal_from, "schedule.anneal_from")
        state = TrainState(**_load(ckpt, adapter, model, optimizer, "schedule.anneal_from",
                                   acc=acc))
        # The earlier run's evals live in its own directory; this one starts its own log.
        state.eval_history, state.task_history, state.eval_loss_before = [], [], None
        state.anneal_at = state.step
        state.anneal_start = (state.last_lr or cfg.optim.lr) / cfg.optim.lr
        start = Start("anneal", ckpt)
    elif cfg.train.init_from is not None:
        ckpt = find_checkpoint(cfg.train.init_from, "train.init_from")
        keep = None if cfg.optim.reset_on_new_data else optimizer
        _load(ckpt, adapter, model, keep, "train.init_from", rng=False, acc=acc)
        state, start = TrainState(), Start("init", ckpt, optimizer_reset=keep is None)
    else:
        state, start = TrainState(), Start("fresh")
    if start.kind in ("resume", "anneal"):
        changed = [s for s, key in data_keys.items() if state.data_keys.get(s, key) != key]
        for stream in changed:  # new data arrived: read it from its beginning
            state.streams.pop(stream, None)
        if changed:
            start.new_data = changed
            if cfg.optim.reset_on_new_data:
                optimizer.state.clear()
                start.optimizer_reset = True
    state.data_keys = dict(data_keys)
    return state, start


def _load(ckpt: Path, adapter: Adapter, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer | None, key: str, rng: bool = True, acc=None
          ) -> dict:
    """:func:`load_checkpoint`, with a mismatch between the checkpoint and this run's
    model or adapter reported as a config error."""
    try:
        return load_checkpoint(ckpt, adapter, model, optimizer, rng, acc)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"{key}: {ckpt} does not fit this run's model and adapter config "
                          f"({type(e).__name__}: {str(e)[:300]})") from None
