"""Preference rows in TRL's formats: detected, validated with file/line/field errors,
the prompt extracted as TRL extracts it, tokenized to the very ids TRL's DPOTrainer
makes, and truncated or dropped by the documented rule."""

from __future__ import annotations

import pytest

from leantune.data.preference import (
    EncodedPreference,
    PreferenceStats,
    detect_preference_format,
    encode_preference,
    shared_prompt,
    to_preference,
)
from leantune.data.rows import DataError, Row

TEXT = {"prompt": "add 2 3 =", "chosen": " 5", "rejected": " 6"}
HH = {"chosen": "\n\nHuman: add 2 3\n\nAssistant: It is 5.",
      "rejected": "\n\nHuman: add 2 3\n\nAssistant: It is 6."}
CHAT = {"chosen": [{"role": "user", "content": "add 2 3"},
                   {"role": "assistant", "content": "It is 5."}],
        "rejected": [{"role": "user", "content": "add 2 3"},
                     {"role": "assistant", "content": "Six, I think."}]}
CHAT_PROMPT = {"prompt": [{"role": "user", "content": "add 2 3"}],
               "chosen": [{"role": "assistant", "content": "It is 5."}],
               "rejected": [{"role": "assistant", "content": "Six, I think."}]}
KTO = {"prompt": "add 2 3 =", "completion": " 5", "label": True}


def row(record, line: int = 7) -> Row:
    return Row("pairs.jsonl", f"line {line}", record)


def test_formats_are_told_from_the_keys():
    assert [detect_preference_format(r) for r in (TEXT, HH, CHAT, CHAT_PROMPT, KTO)] == [
        "pairs", "pairs", "pairs", "pairs", "unpaired"]
    assert detect_preference_format({"prompt": "a", "completion": "b"}) is None
    assert detect_preference_format(["not", "an", "object"]) is None


@pytest.mark.parametrize("record, fmt, field, problem", [
    ({"prompt": "p", "chosen": "a"} | {"rejected": 3}, "pairs", "rejected", "expected text"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "pairs", "chosen", "empty"),
    ({"chosen": [{"role": "human", "content": "x"}], "rejected": []}, "pairs", "chosen[0].role",
     "unknown role"),
    ({"chosen": "a b", "rejected": [{"role": "user", "content": "x"}]}, "pairs", "rejected",
     "mixed"),
    ({"chosen": "same", "rejected": "same"}, "pairs", "chosen", "nothing after the prompt"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "unpaired", "label", "true or false"),
])
def test_a_malformed_row_names_file_line_and_field(record, fmt, field, problem):
    with pytest.raises(DataError) as e:
        to_preference(row(record), fmt)
    assert (e.value.source, e.value.where, e.value.field) == ("pairs.jsonl", "line 7", field)
    assert problem in str(e.value)


def test_the_implicit_prompt_is_what_trl_extracts():
    trl = pytest.importorskip("trl")
    for record in (HH, CHAT):
        theirs = trl.extract_prompt(dict(record))
        assert shared_prompt(record["chosen"], record["rejected"]) == (
            theirs["prompt"], theirs["chosen"], theirs["rejected"])
    p = to_preference(row(HH), "pairs")
    assert p.prompt.endswith("Assistant: It is") and p.chosen == " 5." and p.rejected == " 6."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from conftest import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("pref"), "llama")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("record", [TEXT, HH, CHAT, CHAT_PROMPT], ids=[
    "text", "text-implicit-prompt", "chat-implicit-prompt", "chat-explicit-prompt"])
def test_tokens_are_the_ones_trls_dpo_trainer_makes(record, tiny, tmp_path):
    pytest.importorskip("trl")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    path, tokenizer = tiny
    args = DPOConfig(output_dir=str(tmp_path), max_length=512, report_to=[], use_cpu=True,
                     bf16=False)
    try:
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                             train_dataset=Dataset.from_list([record]),
                             processing_class=tokenizer)
    finally:  # the Trainer sets Accelerate's process-wide state; later runs build their own
        AcceleratorState._reset_state(reset_partial_state=True)
    theirs = trainer.train_dataset[0]
    ours = encode_preference(to_preference(row(record), "pairs"), tokenizer, 512,
                             PreferenceStats())
    assert ours == EncodedPreference(theirs["prompt_ids"], theirs["chosen_ids"],
                                     theirs["rejected_ids"])
    assert ours.chosen != ours.rejected and ours.prompt


def test_truncation_keeps_the_start_and_drops_what_cannot_train(tiny):
    _, tokenizer = tiny
    stats = PreferenceStats()

    def encode(limit: int):
        return encode_preference(to_preference(row(TEXT), "pairs"), tokenizer, limit, stats)

    full = encode(512)
    assert full.chosen[0] == full.rejected[0] != full.chosen[1]  # " " then "5" or "6"
    cut = encode(len(full.prompt) + 2)  # room for two completion tokens: the prompt stays
    assert cut.prompt == full.prompt
    assert (cut.chosen, cut.rejected) == (full.chosen[:2], full.rejected[:2])
    assert stats.truncated == 1
    assert encode(len(full.prompt) + 1) is None  # cut to one token, both are " ": no preference
    assert encode(len(full.prompt)) is None      # the prompt alone fills max_length
    assert (stats.kept, stats.dropped_same_completions, stats.dropped_prompt_too_long) == (2, 1, 1)
    assert stats.rows == 4 and stats.drops == ["pairs.jsonl, line 7"] * 2


def test_unpaired_rows_keep_their_label(tiny):
    _, tokenizer = tiny
    encoded = encode_preference(to_preference(row(KTO), "unpaired"), tokenizer, 512,
                                PreferenceStats())
    assert encoded.rejected is None and encoded.label is True and encoded.chosen
