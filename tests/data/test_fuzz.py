"""Fuzzing the loaders and the config with hypothesis: malformed JSONL / CSV / parquet rows,
wrong types, empty strings, missing roles, non-UTF-8 bytes and enormous lines, and
configs with wrong types and unknown keys. Every input either loads or fails with the
project's own error naming file and line/row (and field, where one is at fault); with
``data.skip_bad_rows`` bad rows are skipped and counted instead. Never a bare traceback.

Derandomized (a fixed example sequence), so a failure here always reproduces.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from leantune.config import ConfigError, DataConfig, load_config
from leantune.data.corpus import iter_documents
from leantune.data.dataset import DataStats, build_splits, load_examples
from leantune.data.sources import DataError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
KEYS = ["text", "prompt", "completion", "instruction", "input", "output", "messages",
        "conversations", "role", "content", "from", "value", "other"]
ROLES = ["user", "assistant", "system", "human", "gpt", "robot", "", None]
texts = st.one_of(st.text(max_size=30), st.just(""), st.just("   "),
                  st.text(min_size=1, max_size=3).map(lambda t: t * 20_000))  # enormous
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    texts)
turns = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": scalars}),
    st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": scalars}),
    scalars), max_size=4)
VALID = {
    "text": lambda t: {"text": t},
    "prompt_completion": lambda t: {"prompt": t, "completion": t},
    "instruction": lambda t: {"instruction": t, "input": "", "output": t},
    "messages": lambda t: {"messages": [{"role": "user", "content": t},
                                        {"role": "assistant", "content": t}]},
    "sharegpt": lambda t: {"conversations": [{"from": "human", "value": t},
                                             {"from": "gpt", "value": t}]},
}


@st.composite
def near_valid(draw) -> dict:
    """A valid row of a random format, then (half the time) one thing broken in it: a key
    dropped, a value of the wrong type or empty, a turn's role unknown or missing."""
    record = VALID[draw(st.sampled_from(sorted(VALID)))](draw(st.text(min_size=1, max_size=20)))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(record)))
        value = record[key]
        if isinstance(value, list) and draw(st.booleans()):
            turn = value[draw(st.integers(0, len(value) - 1))]
            turn[draw(st.sampled_from(sorted(turn)))] = draw(st.sampled_from(ROLES + [5]))
        elif draw(st.booleans()):
            del record[key]
        else:
            record[key] = draw(scalars)
    return record


records = st.one_of(
    near_valid(), near_valid(),
    st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, turns), max_size=4),
    scalars, turns)
LINE_AT = re.compile(r", (line|row|item) (\d+)")


def lines_strategy():
    garbage = st.sampled_from([b"{not json", b"\xff\xfe not utf-8", b"[1, 2", b"", b"   "])
    return st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), garbage),
                    min_size=1, max_size=8)


def check_error(error: DataError, path: Path, rows: int) -> None:
    """The message names the file, and a line/row/item within it (or the file as a whole)."""
    message = str(error)
    event(f"DataError ({'field' if error.field else 'no field'})")
    assert message.startswith(str(path)), message
    where = LINE_AT.search(message[:len(str(path)) + 20])
    if where:
        assert 0 <= int(where.group(2)) <= rows, message
    else:
        assert message.startswith(f"{path}, file"), message


@FUZZ
@given(lines=lines_strategy(), skip=st.booleans())
def test_jsonl_rows_load_or_name_file_line_and_field(lines, skip, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        cfg = DataConfig(path=str(path), skip_bad_rows=skip, max_length=64, eval_fraction=0.0)
        stats = DataStats()
        try:
            examples, _ = load_examples(str(path), cfg, True, stats)
        except DataError as e:
            check_error(e, path, len(lines))
            if skip:  # skipping only ever fails because nothing usable is left
                assert "no usable rows" in str(e)
            return
        event(f"loaded, {stats.bad_rows_skipped} bad rows skipped")
        non_empty = sum(1 for line in lines if line.strip())
        assert stats.rows_read == non_empty == len(examples) + stats.bad_rows_skipped
        try:
            build_splits(cfg, tokenizer, seed=0)
        except DataError as e:  # e.g. every example truncated away: a file-level message
            check_error(e, path, len(lines))


csv_cells = st.one_of(st.text(max_size=20), st.just(""), st.just('a "quoted", cell\nwith lines'))


@FUZZ
@given(columns=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True),
       cells=st.lists(st.lists(csv_cells, min_size=4, max_size=4), min_size=1, max_size=6),
       skip=st.booleans())
def test_csv_rows_load_or_name_file_line_and_field(columns, cells, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(row[:len(columns)] for row in cells)
        cfg = DataConfig(path=str(path), skip_bad_rows=skip)
        try:
            load_examples(str(path), cfg, True, DataStats())
        except DataError as e:
            check_error(e, path, 1 + sum(1 + sum(c.count("\n") for c in r) for r in cells))


parquet_columns = st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=3, max_size=3),
              st.lists(st.integers(-5, 5), min_size=3, max_size=3),
              st.lists(st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["user", "assistant"]),
                   "content": st.text(max_size=5)}), max_size=2), min_size=3, max_size=3)),
    min_size=1, max_size=3)


@FUZZ
@given(columns=parquet_columns, skip=st.booleans())
def test_parquet_rows_load_or_name_file_row_and_field(columns, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.parquet"
        pq.write_table(pa.table(columns), path)
        try:
            load_examples(str(path), DataConfig(path=str(path), skip_bad_rows=skip), True,
                          DataStats())
        except DataError as e:
            check_error(e, path, 3)


@FUZZ
@given(lines=lines_strategy(), field=st.sampled_from(["text", "content", "body"]))
def test_corpus_documents_read_or_name_file_line_and_field(lines, field):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            docs = list(iter_documents(str(path), field))
        except DataError as e:
            check_error(e, path, len(lines))
            return
        assert all(isinstance(d, str) for d in docs)
        skipped = []
        docs = list(iter_documents(str(path), field, on_bad=skipped.append))
        assert len(docs) + len(skipped) == sum(1 for line in lines if line.strip())


SECTIONS = ["model", "data", "adapter", "optim", "schedule", "train", "eval", "checkpoint",
            "fast_forward", "logging", "data.replay", "nope"]
NAMES = ["lr", "path", "mode", "ratio", "batch_size", "max_steps", "kind", "method", "r",
         "betas", "eval_corpora", "enabled", "target_modules", "layers", "schedule", "zzz"]
yaml_values = st.one_of(st.sampled_from(["1", "-1", "0", "1e-4", "true", "null", "[1, 2]",
                                         "{a: b}", "cosine", "corpus", "[]", "''", "x: [",
                                         "0.5", "lora"]), st.text(max_size=10))


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(SECTIONS), st.sampled_from(NAMES),
                                    yaml_values), min_size=1, max_size=4))
def test_configs_load_or_name_the_key(overrides):
    texts = [f"{section}.{name}={value}" for section, name, value in overrides]
    try:
        load_config(None, texts)
        event("loaded")
    except ConfigError as e:
        event("ConfigError")
        named = {f"{s}.{n}" for s, n, _ in overrides} | {s for s, _, _ in overrides}
        message = str(e)
        assert any(k in message for k in named) or "override" in message, message
