"""Checkpoints that are either complete or absent.

``checkpoints/step-N/`` holds ``adapter/`` (the adapter's own format; ``model/`` for full
fine-tuning), ``optimizer.pt``
(tensors only, read back with ``weights_only=True``), ``rng.pt`` and ``trainer_state.json``
(step, data position, counters). Everything is written into ``.tmp-step-N`` first and
renamed into place, so a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantune.adapters import Adapter
from leantune.train.run_dir import RunDirError

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
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        adapter.save(model, tmp / adapter.output_name)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        full_state = {**state, "step": step, "host_rng": _host_rngs()}
        (tmp / "trainer_state.json").write_text(json.dumps(full_state))
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except OSError as e:  # e.g. the disk filled up: drop the partial copy, keep the others
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"could not write checkpoint step-{step} under {root} ({e}); the last "
                          f"complete checkpoint is {latest_checkpoint(run_dir)}") from None
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
        shutil.rmtree(final)
    tmp.rename(final)
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
                    optimizer: torch.optim.Optimizer | None, rng: bool = True) -> dict[str, Any]:
    """Restore adapter weights, optimizer state (unless None) and RNG (if ``rng``); return
    the trainer state."""
    adapter.load_weights(model, path / adapter.output_name)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    host = state.pop("host_rng")
    if rng:
        saved = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
        version, internal, gauss = host["python"]
        random.setstate((version, tuple(internal), gauss))
        keys, pos, has_gauss, cached = host["numpy"]
        np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss,
                             cached))
    return state


def save_output(run_dir: Path, adapter: Adapter, model: torch.nn.Module, tokenizer) -> Path:
    """The run's final ``adapter/`` (or ``model/``), with the tokenizer, written under a
    temporary name and renamed into place: a crash or a full disk never leaves half of it.

    Raises:
        RunDirError: it could not be written (the checkpoints are untouched).
    """
    final = run_dir / adapter.output_name
    tmp = run_dir / f".tmp-{adapter.output_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        adapter.save(model, tmp)
        tokenizer.save_pretrained(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"could not write {final} ({e}); the last checkpoint, "
                          f"{latest_checkpoint(run_dir)}, holds the same weights") from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
