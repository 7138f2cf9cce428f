"""From a data config to train / eval splits: seeded and deterministic, every row counted,
bad rows raised or skipped; and the batches and collator built on top."""

from __future__ import annotations

import json
import re

import pytest
import torch

from leantune.config import DataConfig
from leantune.data.dataset import build_splits
from leantune.data.encode import IGNORE, Encoded
from leantune.data.sources import DataError
from leantune.packing.batching import epoch_batches
from leantune.packing.collate import collate_packed, collate_padded

N = 40


def write_jsonl(path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def qa(i: int) -> dict:
    return {"prompt": f"Q{i}:\n", "completion": f"A{i}."}


@pytest.fixture
def data_path(tmp_path) -> str:
    return write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(N)])


def ids_of(tok, encs: list[Encoded]) -> list[int]:
    """The row number each encoded example came from (``Q{i}:`` in its text)."""
    return [int(re.match(r"Q(\d+):", tok.decode(e.input_ids)).group(1)) for e in encs]


def splits(path, tok, seed=0, **kw):
    return build_splits(DataConfig(path=path, **kw), tok, seed)


def test_split_is_seeded_and_complete(data_path, tokenizer):
    a = splits(data_path, tokenizer, seed=1, eval_fraction=0.25)
    train, held = ids_of(tokenizer, a.train), ids_of(tokenizer, a.eval)
    assert len(held) == 10 and len(train) == 30
    assert sorted(train + held) == list(range(N))  # disjoint and complete
    assert [e.source for e in a.eval_examples] == [f"{data_path}, line {i + 1}" for i in held]
    assert a.format == "prompt_completion"
    s = a.stats
    assert (s.rows_read, s.train_examples, s.eval_examples, s.bad_rows_skipped) == (N, 30, 10, 0)

    b = splits(data_path, tokenizer, seed=1, eval_fraction=0.25)
    assert (ids_of(tokenizer, b.train), ids_of(tokenizer, b.eval)) == (train, held)
    assert b.train == a.train and b.eval == a.eval
    c = splits(data_path, tokenizer, seed=2, eval_fraction=0.25)
    assert set(ids_of(tokenizer, c.eval)) != set(held)
    assert train != list(range(10, N))  # shuffled, not the file order


def test_eval_size_fraction_and_cap(data_path, tokenizer):
    assert len(splits(data_path, tokenizer, eval_fraction=0.0).eval) == 0
    assert len(splits(data_path, tokenizer, eval_fraction=0.1).eval) == 4
    capped = splits(data_path, tokenizer, eval_fraction=0.5, eval_examples=3)
    assert (len(capped.train), len(capped.eval)) == (N - 3, 3)
    # The cap only lowers the count; it never raises it above the fraction.
    assert len(splits(data_path, tokenizer, eval_fraction=0.1, eval_examples=30).eval) == 4


def test_max_examples_subsamples_before_splitting(data_path, tokenizer):
    a = splits(data_path, tokenizer, seed=3, eval_fraction=0.25, max_examples=12)
    assert (len(a.train), len(a.eval), a.stats.rows_read) == (9, 3, N)
    b = splits(data_path, tokenizer, seed=4, eval_fraction=0.25, max_examples=12)
    assert set(ids_of(tokenizer, a.train + a.eval)) != set(ids_of(tokenizer, b.train + b.eval))


def test_separate_eval_file(data_path, tmp_path, tokenizer):
    eval_path = write_jsonl(tmp_path / "e.jsonl", [qa(i) for i in range(100, 106)])
    s = splits(data_path, tokenizer, eval_path=eval_path, eval_examples=4)
    assert sorted(ids_of(tokenizer, s.train)) == list(range(N))  # nothing held out of `path`
    assert ids_of(tokenizer, s.eval) == [100, 101, 102, 103]


def long_rows_file(tmp_path) -> str:
    rows = [qa(i) for i in range(6)]
    rows[1]["completion"] = "A1 " + "the quick brown fox " * 20  # a long completion
    rows[4]["prompt"] = "Q4: " + "the quick brown fox " * 20 + "\n"  # a long prompt
    return write_jsonl(tmp_path / "long.jsonl", rows)


def test_truncation_right_keeps_and_counts(tmp_path, tokenizer):
    s = splits(long_rows_file(tmp_path), tokenizer, eval_fraction=0.0, max_length=24)
    # Row 1 is cut and kept; row 4 is cut inside its prompt, leaving nothing to learn.
    assert (s.stats.truncated, s.stats.dropped_too_long, s.stats.dropped_no_target) == (1, 0, 1)
    assert sorted(ids_of(tokenizer, s.train)) == [0, 1, 2, 3, 5]
    assert max(len(e.input_ids) for e in s.train) == 24
    assert all(e.num_targets > 0 for e in s.train)


def test_truncation_drop_counts(tmp_path, tokenizer):
    s = splits(long_rows_file(tmp_path), tokenizer, eval_fraction=0.0, max_length=24,
               truncation="drop")
    assert (s.stats.truncated, s.stats.dropped_too_long, s.stats.dropped_no_target) == (0, 2, 0)
    assert sorted(ids_of(tokenizer, s.train)) == [0, 2, 3, 5]


def test_every_row_is_accounted_for(tmp_path, tokenizer):
    s = splits(long_rows_file(tmp_path), tokenizer, eval_fraction=0.5, max_length=24)
    st = s.stats
    assert st.rows_read == (st.bad_rows_skipped + st.dropped_too_long + st.dropped_no_target
                            + st.train_examples + st.eval_examples) == 6


def test_nothing_left_after_encoding(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(12345)])
    with pytest.raises(DataError, match=r"no training example left.*: 1 longer than "
                       r"data.max_length and dropped.*raise data.max_length \(now 4\) or use "
                       "data.truncation=right$"):
        splits(path, tokenizer, eval_fraction=0.0, max_length=4, truncation="drop")
    # A prompt that fills max_length leaves no completion token to learn from.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 50, "completion": "x"}])
    with pytest.raises(DataError, match=r"1 with no target token inside it; raise "
                       r"data.max_length \(now 8\) or shorten the prompts"):
        splits(path, tokenizer, eval_fraction=0.0, max_length=8)


BAD = [
    qa(0),
    {"prompt": "Q1:\n"},  # line 2: no completion
    qa(2),
    {"prompt": "Q3:\n", "completion": 3},  # line 4: not a string
    '{"prompt": "Q4:\\n", "completion": ',  # line 5: invalid JSON
    qa(5),
]


def test_bad_rows_raise_with_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError) as e:
        splits(path, tokenizer)
    assert str(e.value) == f"{path}, line 2, field 'completion': missing"


def test_skip_bad_rows_counts_and_keeps_the_good(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    s = splits(path, tokenizer, eval_fraction=0.0, skip_bad_rows=True)
    assert sorted(ids_of(tokenizer, s.train)) == [0, 2, 5]
    assert (s.stats.rows_read, s.stats.bad_rows_skipped) == (6, 3)
    samples = s.stats.bad_row_samples
    assert [re.search(r"line (\d+)", m).group(1) for m in samples] == ["2", "4", "5"]
    assert "invalid JSON" in samples[2]


def test_empty_or_all_bad_file(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    for content in ("", "\n  \n"):
        path.write_text(content)
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}, file: empty: no rows"):
            splits(str(path), tokenizer)
    path = write_jsonl(path, [{"prompt": "p"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"no usable rows \(2 of 2 malformed and skipped\)"):
        splits(str(path), tokenizer, skip_bad_rows=True)


def test_collate_padded():
    a = Encoded([5, 6, 7], [IGNORE, 6, 7])
    b = Encoded([8, 9, 10, 11, 12], [IGNORE, IGNORE, 10, 11, 12])
    batch = collate_padded([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_mask", "num_examples",
                          "example_index", "prompt_position", "prompt_length"}
    assert all(batch[k].shape == (2, 5) and batch[k].dtype == torch.long
               for k in ("input_ids", "attention_mask", "labels"))
    assert torch.equal(batch["token_mask"], batch["attention_mask"].bool())
    assert int(batch["num_examples"]) == 2
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE],
                                        [IGNORE, IGNORE, 10, 11, 12]]
    # Where each prompt lies (the tokens before the first target): index in it, its length.
    assert batch["prompt_position"].tolist() == [[0, -1, -1, -1, -1], [0, 1, -1, -1, -1]]
    assert batch["prompt_length"].tolist() == [[1, 0, 0, 0, 0], [2, 2, 0, 0, 0]]
    packed = collate_packed([a, b], [[1, 0]], pad_id=0)  # every packed example its own prompt
    assert packed["prompt_position"].tolist() == [[0, 1, -1, -1, -1, 0, -1, -1]]
    assert packed["prompt_length"].tolist() == [[2, 2, 0, 0, 0, 1, 0, 0]]
    assert batch["example_index"].tolist() == [[0, 0, 0, -1, -1], [1, 1, 1, 1, 1]]
    assert packed["example_index"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_epoch_batches():
    batches = epoch_batches(10, 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(10)) and flat != list(range(10))
    assert epoch_batches(10, 3, seed=0, epoch=0) == batches
    assert epoch_batches(10, 3, seed=0, epoch=1) != batches
    assert epoch_batches(10, 3, seed=1, epoch=0) != batches
    assert epoch_batches(10, 16, seed=0, epoch=0) == [flat]  # one short batch, same order
    assert epoch_batches(0, 3, seed=0, epoch=0) == []


def test_ff_set_holds_the_usable_rows_it_asks_for(tmp_path, tokenizer):
    # Every other row's prompt fills max_length, so it encodes to no target: the FF set
    # skips those (to no split) and still gets 6 usable rows, disjoint from train.
    rows = [qa(i) if i % 2 else {"prompt": f"Q{i}:" + " word" * 200, "completion": "A."}
            for i in range(N)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    got = build_splits(DataConfig(path=path, max_length=32, eval_fraction=0.0), tokenizer, 0,
                       ff_examples=6)
    assert len(got.ff) == 6 and all(e.num_targets > 0 for e in got.ff)
    ff, train = ids_of(tokenizer, got.ff), ids_of(tokenizer, got.train)
    assert not set(ff) & set(train) and len(ff) + len(train) == N // 2
    assert got.stats.ff_examples == 6 and got.stats.dropped_no_target == N // 2
