"""Reading rows: every supported file type gives the same records, each tagged with where
it came from, and malformed input fails naming the file and the line."""

from __future__ import annotations

import json

import pytest

from leantune.data.embedded import recover_json_array
from leantune.data.sources import DataError, read_rows

RECORDS = [
    {"prompt": "Q: 1+1?", "completion": "2"},
    {"prompt": "Q: capital, France?", "completion": "Paris"},
    {"prompt": "Q: say \"hi\"", "completion": "hi"},
]


def rows(path, **kw) -> list[tuple[str, object]]:
    return [(r.where, r.record) for r in read_rows(str(path), **kw)]


def data_error(path) -> DataError:
    with pytest.raises(DataError) as e:
        list(read_rows(str(path)))
    return e.value


def test_jsonl_counts_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "   ", json.dumps(RECORDS[2])]
    path.write_text("\n".join(lines))  # no trailing newline on the last record
    assert rows(path) == [("line 1", RECORDS[0]), ("line 3", RECORDS[1]), ("line 5", RECORDS[2])]
    assert {r.source for r in read_rows(str(path))} == {str(path)}


def test_jsonl_crlf_and_unicode(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "héllo ✓"}\r\n{"text": "b"}\r\n'.encode())
    assert rows(path) == [("line 1", {"text": "héllo ✓"}), ("line 2", {"text": "b"})]


@pytest.mark.parametrize("wrap", [lambda recs: recs, lambda recs: {"data": recs}])
def test_json_array_and_data_key(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(RECORDS), indent=2))
    assert rows(path) == [(f"item {i}", r) for i, r in enumerate(RECORDS)]


def test_json_that_is_not_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": RECORDS}))
    assert "expected a JSON array" in str(data_error(path))


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,}\n]')
    err = data_error(path)
    assert err.where == "line 3" and str(err).startswith(f"{path}, line 3: invalid JSON")


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    path = tmp_path / f"d{suffix}"
    path.write_text(
        delimiter.join(["prompt", "completion"]) + "\n"
        + delimiter.join(['"Q: 1+1?"', "2"]) + "\n"
        + "\n"  # blank line 3: skipped, but still counted
        + delimiter.join(['"Q: capital, France?"', "Paris"]) + "\n"
        + delimiter.join(['"Q: say ""hi"""', "hi"]) + "\n",
        encoding="utf-8",
    )
    assert rows(path) == [("line 2", RECORDS[0]), ("line 4", RECORDS[1]), ("line 5", RECORDS[2])]


def test_csv_short_row_has_missing_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nonly a prompt\n")
    assert rows(path) == [("line 2", {"prompt": "only a prompt", "completion": None})]


def test_parquet_keeps_nested_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "n": 1},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "n": 2}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    assert rows(path) == [("row 0", recs[0]), ("row 1", recs[1])]


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    assert "unreadable parquet" in str(data_error(path))


def test_datasets_dir_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "single"))
    assert rows(tmp_path / "single") == [(f"row {i}", r) for i, r in enumerate(RECORDS)]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:2]),
                               "test": datasets.Dataset.from_list(RECORDS[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert rows(tmp_path / "dict") == [("row 0", RECORDS[0]), ("row 1", RECORDS[1])]
    got = list(read_rows(str(tmp_path / "dict"), split="test"))
    assert [(r.source, r.where, r.record) for r in got] == [
        (f"{tmp_path / 'dict'}[test]", "row 0", RECORDS[2])]
    with pytest.raises(DataError, match=r"no split 'validation'; has \['train', 'test'\]"):
        list(read_rows(str(tmp_path / "dict"), split="validation"))


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("text files belong to data.mode=corpus")
    with pytest.raises(DataError, match=r"directory: not a dataset saved with `save_to_disk`.*"
                       "data.mode=corpus"):
        list(read_rows(str(tmp_path)))


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"prompt": "x", completion: 1}\n')
    it = read_rows(str(path))
    assert next(it).record == RECORDS[0]  # rows before the bad line are still read
    with pytest.raises(DataError) as e:
        next(it)
    assert (e.value.source, e.value.where) == (str(path), "line 3")
    assert str(e.value).startswith(f"{path}, line 3: invalid JSON")
    assert str(e.value).endswith("at column 17")  # the unquoted key `completion`


def test_undecodable_lines_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": \n{"text": "caf\xe9"}\n\n{"text": "b"}\n')
    errors = []
    assert rows(path, on_bad=errors.append) == [("line 1", {"text": "a"}), ("line 5", {"text": "b"})]
    assert [e.where for e in errors] == ["line 2", "line 3"]
    # The column of a line cut short is its end, not column 1 of a phantom next line.
    assert errors[0].problem == "invalid JSON: Expecting value at column 10"
    assert errors[1].problem.startswith("not UTF-8")


def test_non_utf8_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    err = data_error(path)
    assert err.where == "line 2" and str(err).startswith(f"{path}, line 2: not UTF-8")


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\ncaf\xe9\n")
    assert str(data_error(path)).startswith(f"{path}, file: not UTF-8")


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    err = data_error(path)
    assert str(err).startswith(f"{path}, file: unknown extension")


def test_missing_path_is_not_found_offline(tmp_path):
    # Not a local file, so it is tried as a hub id; offline, that must fail clearly.
    with pytest.raises(FileNotFoundError, match="not a local file or directory"):
        list(read_rows(str(tmp_path / "missing" / "nothing")))


# ---------------------------------------------------------------------------------------
# recover_json_array: the embedded ShareGPT file is a JSON array cut off inside the wheel.

ITEMS = [{"id": "a", "conversations": [{"from": "human", "value": "hi, [there]"}]},
         "a string with \"quotes\" and ] and ,",
         [1, [2, {"k": None}]],
         12345, -1.25e-3, 7,
         {"id": "b", "x": 1.25e-3, "ok": True}]


def serialized(items, sep=", ") -> tuple[str, list[int]]:
    """The JSON text of ``items`` and the offset just past each element."""
    text, ends = "[", []
    for i, item in enumerate(items):
        text += (sep if i else "") + json.dumps(item)
        ends.append(len(text))
    return text + "]", ends


@pytest.mark.parametrize("sep", [", ", ",\n  "])
def test_recover_whole_array(sep):
    text, _ = serialized(ITEMS, sep)
    assert json.loads(text) == ITEMS
    assert recover_json_array("  " + text + "\n") == (ITEMS, True)
    assert recover_json_array("[]") == ([], True)


def test_recover_truncated_array_at_every_cut():
    text, ends = serialized(ITEMS)
    for cut in range(1, len(text)):  # every strict prefix that contains the "["
        items, complete = recover_json_array(text[:cut])
        assert complete is False, cut
        # Never a damaged element (a number cut at the end may have lost digits) ...
        assert items == ITEMS[: len(items)], (cut, text[:cut])
        # ... and every element followed by its separator is recovered.
        assert len(items) >= sum(end < cut for end in ends), (cut, text[:cut])


def test_recover_truncated_array_of_objects():
    items = [{"id": i, "text": "x" * i} for i in range(5)]
    text, ends = serialized(items)
    assert recover_json_array(text[: ends[2]]) == (items[:3], False)  # cut right after "}"
    assert recover_json_array(text[: ends[2] + 1]) == (items[:3], False)  # after the comma
    assert recover_json_array(text[: ends[3] - 1]) == (items[:3], False)  # inside item 3


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"no such data file: {missing}"):
        list(read_rows(str(missing)))
