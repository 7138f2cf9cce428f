"""Files that are either whole or absent: everything leantune writes (checkpoints, the
adapter, ``summary.json``, caches, exports, reports) is written to a temporary sibling
and renamed into place, so a crash or a full disk never leaves a half-written file where
a reader (a resume, a later run, llama.cpp) would take it for a complete one. A rename
within one directory is atomic on POSIX file systems."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_sibling(path: Path) -> Path:
    """``<dir>/.<name>.tmp-<pid>``: hidden, per process, beside ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Write the yielded temporary path; when the block ends it replaces ``path`` (an old
    file of that name stays until then), and when the block raises it is removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, tmp: Path | None = None, fsync: bool = False,
               replace: bool = True, fresh: bool = True) -> Iterator[Path]:
    """Fill the yielded directory (not created yet: the writer makes it); when the block
    ends it becomes ``path``, and when the block raises it is removed.

    Args:
        tmp: the temporary directory (default :func:`temp_sibling`), for callers that
            clear their own debris by name.
        fsync: flush every file to disk before the rename (checkpoints: a power loss
            must not leave a renamed directory of empty files).
        replace: an existing ``path`` is removed just before the rename; with False it is
            kept and the new copy dropped (a cache another process completed first).
        fresh: clear ``tmp`` first; False keeps what the caller (every process of a
            collective save) has already written there.
    """
    path = Path(path)
    tmp = tmp or temp_sibling(path)
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
        if path.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON (non-finite floats as null), atomically."""
    write_text(path, json.dumps(jsonable(data), indent=indent) + "\n")
