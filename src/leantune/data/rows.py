"""A row of input data and the error that names where a bad one came from: file, line or
row number, and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """A malformed input; the message names the file, the line/row and the field."""

    def __init__(self, source: str, where: str, field: str | None, problem: str):
        self.source, self.where, self.field, self.problem = source, where, field, problem
        at = f", field {field!r}" if field else ""
        super().__init__(", ".join(filter(None, (source, where))) + f"{at}: {problem}")


@dataclass(frozen=True)
class Row:
    """One input record and where it came from, e.g. ``("data.jsonl", "line 7")``."""

    source: str
    where: str
    record: Any
