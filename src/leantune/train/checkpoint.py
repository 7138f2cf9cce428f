"""Checkpoints that are either complete or absent.

``checkpoints/step-N/`` holds ``adapter/`` (the adapter's own format; ``model/`` for full
fine-tuning), ``trainer_state.json`` (step, data position, counters) and either

- ``optimizer.pt`` (tensors only, read back with ``weights_only=True``) and ``rng.pt``
  (format ``leantune``, written by the main process), or
- ``accelerate/``: ``Accelerator.save_state`` (format ``accelerate``: model and optimizer
  sharded per process under FSDP or DeepSpeed, every process's RNG), with ``adapter/``
  gathered from the shards so the checkpoint is usable on its own.

Everything is written into ``.tmp-step-N`` first and renamed into place, so a crash
mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantune.adapters import Adapter
from leantune.common.files import atomic_dir
from leantune.train.run_dir import RunDirError
from leantune.train.sharding import (
    full_weights_into_shards,
    is_sharded,
    load_dcp_unsharded,
    saved_sharded,
    shard_optimizer_state,
    sharded,
)

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _host_rngs() -> dict[str, Any]:
    """Python's and NumPy's RNG states as JSON-able lists."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def save_checkpoint(run_dir: Path, step: int, adapter: Adapter, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last_n: int
                    ) -> Path:
    """Write ``checkpoints/step-{step}`` atomically and prune to ``keep_last_n``."""
    def write(tmp: Path) -> None:
        adapter.save(model, tmp / adapter.output_name)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")

    tmp = _tmp_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    return _commit(run_dir, step, state, keep_last_n, write)


def save_accelerate_checkpoint(run_dir: Path, step: int, adapter: Adapter, acc,
                               model: torch.nn.Module, state: dict[str, Any], keep_last_n: int
                               ) -> Path | None:
    """Format ``accelerate``: every process calls this (``save_state`` and gathering the
    shards are collective); the main process writes the rest and renames. Returns the
    checkpoint on the main process, None elsewhere."""
    tmp = _tmp_dir(run_dir, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "accelerate"))
    full = acc.get_state_dict(model)  # the whole model on the main process
    path = None
    if acc.is_main_process:
        path = _commit(run_dir, step, state, keep_last_n, lambda t: adapter.save(
            acc.unwrap_model(model), t / adapter.output_name, state_dict=full))
    acc.wait_for_everyone()
    return path


def accelerate_format(fmt: str, acc) -> bool:
    """Whether checkpoints go through ``Accelerator.save_state`` (``checkpoint.format``):
    always for ``accelerate``, and for ``auto`` when parameters are sharded."""
    return fmt == "accelerate" or (fmt == "auto" and sharded(acc))


def _tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".tmp-step-{step}"


def _commit(run_dir: Path, step: int, state: dict[str, Any], keep_last_n: int,
            write: Callable[[Path], None]) -> Path:
    """Finish ``.tmp-step-N`` (``write`` fills it, then the trainer state), flush it to
    disk, rename it to ``step-N`` and prune older checkpoints."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    try:  # re-saving the same step (e.g. final == periodic) replaces it
        with atomic_dir(final, _tmp_dir(run_dir, step), fsync=True, fresh=False) as tmp:
            tmp.mkdir(exist_ok=True)
            write(tmp)
            full_state = {**state, "step": step, "host_rng": _host_rngs()}
            (tmp / "trainer_state.json").write_text(json.dumps(full_state))
    except OSError as e:  # e.g. the disk filled up: the partial copy is gone, the others kept
        raise RunDirError(f"could not write checkpoint step-{step} under {root} ({e}); the last "
                          f"complete checkpoint is {latest_checkpoint(run_dir)}") from None
    _prune(root, keep_last_n)
    return final


def _prune(root: Path, keep_last_n: int) -> None:
    steps = sorted(checkpoints(root.parent), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[: max(0, len(steps) - max(1, keep_last_n))]:
        shutil.rmtree(old)
    for leftover in root.glob(".tmp-step-*"):  # debris of a crash mid-write
        shutil.rmtree(leftover, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, in no particular order."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def load_checkpoint(path: Path, adapter: Adapter, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, rng: bool = True, acc=None
                    ) -> dict[str, Any]:
    """Restore adapter weights, optimizer state (unless None) and RNG (if ``rng``); return
    the trainer state. A checkpoint of format ``accelerate`` restores model, optimizer and
    RNG through ``acc.load_state`` when the optimizer is wanted (resume, anneal)."""
    state = json.loads((path / "trainer_state.json").read_text())
    host = state.pop("host_rng")
    saved = path / "accelerate"
    if saved.is_dir() and optimizer is not None:
        if saved_sharded(saved) == is_sharded(model):  # the layout it was written in
            if acc is None:
                raise ValueError(f"{path} holds an Accelerate state; loading it needs the "
                                 "run's Accelerator")
            kept = None if rng else _all_rngs()
            acc.load_state(str(saved))
            if kept is not None:
                _set_all_rngs(kept)
            return state
        _load_across_layouts(path, adapter, model, optimizer)
        return state
    with full_weights_into_shards(model):
        adapter.load_weights(model, path / adapter.output_name)
    if optimizer is not None:
        moments = torch.load(path / "optimizer.pt", weights_only=True)
        shard_optimizer_state(moments, optimizer)
        optimizer.load_state_dict(moments)
    if rng:
        saved = torch.load(path / "rng.pt", weights_only=True)
        _set_all_rngs((saved, host))
    return state


def _load_across_layouts(path: Path, adapter: Adapter, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """An Accelerate checkpoint into a run laid out otherwise (see
    :mod:`leantune.train.sharding`): written under FSDP2 and read unsharded, or written
    whole (its ``adapter/`` and ``optimizer.bin``) and read into shards. Each process's
    RNG is not restored (it belonged to another layout); dropout draws anew."""
    saved = path / "accelerate"
    if saved_sharded(saved):
        load_dcp_unsharded(saved, model, optimizer)
    else:
        with full_weights_into_shards(model):
            adapter.load_weights(model, path / adapter.output_name)
        moments = torch.load(saved / "optimizer.bin", weights_only=True)
        shard_optimizer_state(moments, optimizer)
        optimizer.load_state_dict(moments)
    log.warning("%s was written %s and is read %s: weights and optimizer restored, each "
                "process's random state not", path, *(
                    ("sharded (FSDP2)", "unsharded") if saved_sharded(saved)
                    else ("unsharded", "into FSDP2 shards")))


def _all_rngs() -> tuple[dict[str, Any], dict[str, Any]]:
    return _rng_state(), _host_rngs()


def _set_all_rngs(rngs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    saved, host = rngs
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_output(run_dir: Path, adapter: Adapter, model: torch.nn.Module, tokenizer,
                state_dict: dict | None = None) -> Path:
    """The run's final ``adapter/`` (or ``model/``), with the tokenizer, written under a
    temporary name and renamed into place: a crash or a full disk never leaves half of it.
    ``state_dict``: the gathered weights when the model is sharded.

    Raises:
        RunDirError: it could not be written (the checkpoints are untouched).
    """
    final = run_dir / adapter.output_name
    try:
        with atomic_dir(final, run_dir / f".tmp-{adapter.output_name}") as tmp:
            adapter.save(model, tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise RunDirError(f"could not write {final} ({e}); the last checkpoint, "
                          f"{latest_checkpoint(run_dir)}, holds the same weights") from None
    return final
