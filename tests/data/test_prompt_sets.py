"""GRPO's prompt rows: the problems source deals distinct problems (no held-out prompt is
trained on), files in TRL's prompt format load with their columns, and a malformed row
names its file, line and field."""

from __future__ import annotations

import json

import pytest

from leantune.config import DataConfig
from leantune.data.prompt_sets import build_prompt_splits, problem_source
from leantune.data.rows import DataError

from conftest import make_tokenizer


def test_problem_source_is_distinct_and_fixed():
    rows = problem_source("problems:add")
    assert len(rows) == 100  # every a + b with one-digit a and b
    texts = [r.record["prompt"][0]["content"] for r in rows]
    assert len(set(texts)) == 100 and texts == [r.record["prompt"][0]["content"]
                                                for r in problem_source("problems:add")]
    two = problem_source("problems:add:2")
    assert len(two) > 1000 and all(len(r.record["answer"]) >= 2 for r in two)
    with pytest.raises(DataError, match="problems:KIND"):
        problem_source("problems:divide")


def test_splits_are_disjoint_and_seeded():
    tok = make_tokenizer()
    cfg = DataConfig(path="problems:add", eval_fraction=0.2, max_length=512)
    a = build_prompt_splits(cfg, tok, seed=1, max_completion=16)
    b = build_prompt_splits(cfg, tok, seed=1, max_completion=16)
    assert (len(a.train), len(a.eval)) == (80, 20)
    held = {p.prompt[0]["content"] for p in a.eval}
    assert not held & {p.prompt[0]["content"] for p in a.train}
    assert [p.ids for p in a.train] == [p.ids for p in b.train]
    assert all(p.columns.keys() == {"answer"} for p in a.train)


def test_a_prompts_file_loads_with_its_columns_and_long_prompts_are_counted(tmp_path):
    tok = make_tokenizer()
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2 =", "answer": "4", "level": 1}) + "\n"
                    + json.dumps({"prompt": "x " * 400, "answer": "0"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "1 + 1?"}],
                                  "answer": "2"}) + "\n")
    splits = build_prompt_splits(DataConfig(path=str(path), eval_fraction=0.0, max_length=128),
                                 tok, seed=0, max_completion=16)
    assert len(splits.train) == 2 and splits.stats["dropped_prompt_too_long"] == 1
    plain = next(p for p in splits.train if isinstance(p.prompt, str))
    assert plain.columns == {"answer": "4", "level": 1}
    chat = next(p for p in splits.train if isinstance(p.prompt, list))
    assert "<|im_start|>assistant" in tok.decode(chat.ids)  # rendered with its generation prompt


@pytest.mark.parametrize("row,problem", [
    ({"question": "2 + 2"}, "needs a 'prompt'"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, "list of"),
    ({"prompt": 7}, "must be a string"),
])
def test_a_malformed_row_names_file_line_and_field(tmp_path, row, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl, line 2, field 'prompt': .*{problem}"):
        build_prompt_splits(DataConfig(path=str(path), eval_fraction=0.0), make_tokenizer(),
                            seed=0, max_completion=16)
