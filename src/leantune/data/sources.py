"""Read rows from files, `datasets` directories and hub ids, keeping where each row came
from (file and line or row number) so that a bad row can be named precisely.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from leantune.data.embedded import sharegpt_rows
from leantune.data.rows import DataError, Row
from leantune.data.tasks import task_rows

log = logging.getLogger(__name__)


def read_rows(path: str, split: str = "train",
              on_bad: Callable[[DataError], None] | None = None) -> Iterator[Row]:
    """Yield every row of a JSONL / JSON / CSV / parquet file, a `datasets` dir or hub id.

    Args:
        on_bad: called with the error of each JSONL line that cannot be decoded (bad JSON
            or UTF-8), which is then skipped; None raises it instead.

    Raises:
        DataError: unreadable file or unparsable line, with file and line.
        FileNotFoundError: the path exists neither locally nor as a hub id.
    """
    if path == "embedded:sharegpt":
        yield from sharegpt_rows()
        return
    if path.startswith("task:"):
        yield from task_rows(path, split)
        return
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet") and not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    if p.is_dir():
        yield from _read_datasets_dir(p, split)
    elif p.suffix == ".jsonl":
        yield from _read_jsonl(p, on_bad)
    elif p.suffix == ".json":
        yield from _read_json(p)
    elif p.suffix in (".csv", ".tsv"):
        yield from _read_csv(p, "\t" if p.suffix == ".tsv" else ",")
    elif p.suffix == ".parquet":
        yield from _read_parquet(p)
    elif p.exists():
        raise DataError(str(p), "file", None, "unknown extension; use .jsonl, .json, .csv, "
                        ".tsv, .parquet or a datasets directory")
    else:
        yield from _read_hub(path, split)


def _read_jsonl(p: Path, on_bad: Callable[[DataError], None] | None) -> Iterator[Row]:
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # so that e.colno stays on this line
                if text.strip():
                    yield Row(str(p), f"line {n}", json.loads(text))
                continue
            except UnicodeDecodeError as e:
                error = DataError(str(p), f"line {n}", None, f"not UTF-8 ({e.reason} at byte "
                                  f"{e.start})")
            except json.JSONDecodeError as e:
                error = DataError(str(p), f"line {n}", None, f"invalid JSON: {e.msg} at column "
                                  f"{e.colno}")
            if on_bad is None:
                raise error
            on_bad(error)


def _read_json(p: Path) -> Iterator[Row]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(str(p), "file", None, f"not UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(str(p), f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), "file", None, "expected a JSON array of rows (or {'data': [...]})")
    for i, rec in enumerate(data):
        yield Row(str(p), f"item {i}", rec)


def _read_csv(p: Path, delimiter: str) -> Iterator[Row]:
    try:
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            for rec in reader:
                yield Row(str(p), f"line {reader.line_num}", rec)
    except UnicodeDecodeError as e:
        raise DataError(str(p), "file", None, f"not UTF-8 ({e.reason})") from None
    except csv.Error as e:
        raise DataError(str(p), "file", None, f"invalid CSV: {e}") from None


def _read_parquet(p: Path) -> Iterator[Row]:
    """Row by row, a batch of rows at a time, so a file larger than memory streams."""
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield Row(str(p), f"row {i}", rec)
                i += 1
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(str(p), "file" if i == 0 else f"row {i}", None,
                        f"unreadable parquet: {e}") from None


def _read_datasets_dir(p: Path, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise DataError(str(p), "directory", None, "not a dataset saved with `save_to_disk`; "
                        "give a .jsonl, .json, .csv, .tsv or .parquet file, or use "
                        "data.mode=corpus to read a directory of text files") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(str(p), "dataset", None, f"no split {split!r}; has {list(ds)}")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield Row(f"{p}[{split}]", f"row {i}", rec)


def _read_hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline machines land here: say what was tried
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and loading it as a hub dataset "
            f"failed ({type(e).__name__}: {e})"
        ) from None
    for i, rec in enumerate(ds):
        yield Row(f"{name}[{split}]", f"row {i}", rec)


def set_name(path: str, taken: set[str]) -> str:
    """A short, unique name for a data set: its directory name, or its file name without
    the suffix (``embedded:sharegpt`` -> ``sharegpt``)."""
    p = Path(path.rstrip("/"))
    base = path.split(":", 1)[1] if path.startswith("embedded:") else (
        p.name if p.is_dir() else p.stem)
    name, k = base or "data", 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name
