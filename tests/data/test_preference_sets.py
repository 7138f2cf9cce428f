"""A preference run's data: rows split into held-out, FF and training pairs that never
share a row; KTO's rows unpaired, each with a mismatched completion for its KL term;
pairs built from a task's gold and wrong answers; bad input named by file, line and
field, or by the config key to change."""

from __future__ import annotations

import json

import pytest

from leantune.config import ConfigError, DataConfig
from leantune.data.preference_sets import build_preference_splits, is_pair_file
from leantune.data.rows import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from conftest import save_tiny_model

    return AutoTokenizer.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("t"), "llama"))


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i} add {i} 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 7}"}
            for i in range(n)]


def test_splits_never_share_a_row(tokenizer, tmp_path):
    path = write(tmp_path / "p.jsonl", pair_rows(40))
    cfg = DataConfig(path=path, eval_fraction=0.25, max_length=64)
    s = build_preference_splits(cfg, tokenizer, seed=1, kind="dpo", ff_examples=4)
    assert (len(s.train), len(s.eval), len(s.ff)) == (26, 10, 4)
    prompts = [tuple(p.prompt) for p in s.train + s.eval + s.ff]
    assert len(set(prompts)) == 40 and s.format == "pairs"
    again = build_preference_splits(cfg, tokenizer, seed=1, kind="dpo", ff_examples=4)
    assert [p.prompt for p in again.eval] == [p.prompt for p in s.eval]  # seeded
    assert s.to_dict()["train_examples"] == 26


def test_kto_unpairs_and_gives_each_example_a_mismatched_completion(tokenizer, tmp_path):
    path = write(tmp_path / "p.jsonl", pair_rows(10))
    cfg = DataConfig(path=path, eval_fraction=0.2, max_length=64)
    s = build_preference_splits(cfg, tokenizer, seed=0, kind="kto")
    assert len(s.train) == 16 and len(s.eval) == 4  # two examples per pair
    assert sorted(p.label for p in s.train) == [False] * 8 + [True] * 8
    own = [tuple(p.chosen) for p in s.train]
    assert sorted(tuple(p.rejected) for p in s.train) == sorted(own)  # a permutation
    assert all(p.rejected != p.chosen for p in s.train)


def test_unpaired_rows_need_kto(tokenizer, tmp_path):
    path = write(tmp_path / "u.jsonl", [{"prompt": "a", "completion": " b", "label": True}] * 4)
    with pytest.raises(ConfigError, match="objective.kind=kto"):
        build_preference_splits(DataConfig(path=path), tokenizer, 0, "dpo")
    s = build_preference_splits(DataConfig(path=path, eval_fraction=0.0), tokenizer, 0, "kto")
    assert len(s.train) == 4 and s.format == "unpaired"


@pytest.mark.parametrize("bad, where", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "not a preference row"),
    ({"prompt": "a", "completion": " b", "label": True}, "a row in the unpaired format, in a file of pairs"),
    ({"prompt": "a", "chosen": 3, "rejected": " c"}, "chosen"),
])
def test_a_bad_row_names_file_line_and_field(tokenizer, tmp_path, bad, where):
    path = write(tmp_path / "bad.jsonl", pair_rows(3) + [bad])
    with pytest.raises(DataError, match=f"bad.jsonl.*line 4.*{where}"):
        build_preference_splits(DataConfig(path=path), tokenizer, 0, "dpo")
    skipped = build_preference_splits(DataConfig(path=path, skip_bad_rows=True,
                                                 eval_fraction=0.0), tokenizer, 0, "dpo")
    assert skipped.bad_rows_skipped == 1 and len(skipped.train) == 3


def test_pairs_that_cannot_train_are_dropped_and_counted(tokenizer, tmp_path):
    rows = pair_rows(4) + [{"prompt": "long " * 80, "chosen": " a", "rejected": " b"},
                           {"prompt": "same", "chosen": " x", "rejected": " x"}]
    path = write(tmp_path / "p.jsonl", rows)
    s = build_preference_splits(DataConfig(path=path, eval_fraction=0.0, max_length=32),
                                tokenizer, 0, "dpo")
    assert len(s.train) == 4
    assert (s.stats.dropped_prompt_too_long, s.stats.dropped_same_completions) == (1, 1)


def test_a_task_gives_gold_against_wrong_answer_pairs(tokenizer, olmo):
    cfg = DataConfig(path="task:arc-e", eval_fraction=0.0, max_length=512)
    s = build_preference_splits(cfg, tokenizer, 0, "dpo")
    assert len(s.train) == 12  # the fake task's 12 training documents
    for p in s.train:
        prompt = tokenizer.decode(p.prompt)
        d = int(prompt.rsplit("What is ", 1)[1].split(" ")[0])
        gold = str(d + 1) if d % 2 == 0 else str(d + 2)
        assert tokenizer.decode(p.chosen).strip().startswith(gold)
        assert not tokenizer.decode(p.rejected).strip().startswith(gold)
    assert not is_pair_file("task:arc-e")  # the same path trains SFT on the gold answers
