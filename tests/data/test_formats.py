"""Row formats: detection from keys, conversion to Examples (chat messages or plain-text
segments), and bad rows that fail naming the file, the line and the field."""

from __future__ import annotations

import pytest

from leantune.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    Example,
    detect_format,
    to_example,
)
from leantune.data.sources import DataError, Row


def row(record) -> Row:
    return Row("data.jsonl", "line 7", record)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


@pytest.mark.parametrize("record, fmt", [
    ({"text": "x"}, "text"),
    ({"prompt": "p", "completion": "c", "text": "ignored"}, "prompt_completion"),
    ({"instruction": "i", "input": "", "output": "o"}, "instruction"),
    ({"messages": [], "text": "x"}, "messages"),
    ({"conversations": [], "id": "1"}, "sharegpt"),
])
def test_detect_format(record, fmt):
    assert detect_format(record, row(record)) == fmt


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "p", "answer": "a"}, "cannot tell the format from keys ['answer', 'prompt']"),
    (["not", "an", "object"], "expected an object, got list"),
])
def test_detect_format_fails_naming_the_row(record, problem):
    with pytest.raises(DataError) as e:
        detect_format(record, row(record))
    assert str(e.value).startswith("data.jsonl, line 7: ") and problem in str(e.value)


def test_text_and_prompt_completion():
    ex = to_example(row({"text": "hello"}), "text", True)
    assert ex == Example("data.jsonl, line 7", segments=[("hello", True)])
    ex = to_example(row({"prompt": "Q?\n", "completion": "A."}), "prompt_completion", True)
    assert ex.segments == [("Q?\n", False), ("A.", True)] and ex.messages is None
    # An empty prompt is allowed (a missing one is not): the whole row is the completion.
    ex = to_example(row({"prompt": "", "completion": "A."}), "prompt_completion", True)
    assert ex.segments == [("", False), ("A.", True)]


def test_instruction_with_chat_template():
    ex = to_example(row({"instruction": "Translate.", "output": "hello"}), "instruction", True)
    assert ex.messages == chat(("user", "Translate."), ("assistant", "hello"))
    ex = to_example(row({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
                    "instruction", True, system_prompt="Be brief.")
    assert ex.messages == chat(("system", "Be brief."), ("user", "Translate.\n\nbonjour"),
                               ("assistant", "hello"))


def test_instruction_alpaca_fallback_without_chat_template():
    ex = to_example(row({"instruction": "Translate.", "input": "  ", "output": "hello"}),
                    "instruction", False)
    assert ex.segments == [("### Instruction:\nTranslate.\n\n### Response:\n", False),
                           ("hello", True)]
    assert ex.segments[0][0] == ALPACA_PROMPT.format(instruction="Translate.")
    ex = to_example(row({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
                    "instruction", False, system_prompt="ignored without a template")
    assert ex.segments == [(ALPACA_PROMPT_INPUT.format(instruction="Translate.", input="bonjour"),
                            False), ("hello", True)]
    assert "### Input:\nbonjour\n\n### Response:\n" in ex.segments[0][0]


def test_messages_and_system_prompt():
    msgs = chat(("user", "q"), ("assistant", "a"))
    assert to_example(row({"messages": msgs}), "messages", True).messages == msgs
    ex = to_example(row({"messages": msgs}), "messages", True, system_prompt="S")
    assert ex.messages == chat(("system", "S"), *[(m["role"], m["content"]) for m in msgs])
    own = chat(("system", "mine"), ("user", "q"), ("assistant", "a"))
    assert to_example(row({"messages": own}), "messages", True, system_prompt="S").messages == own


def test_sharegpt_role_mapping():
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"}, {"from": "user", "value": "q2"},
            {"from": "chatgpt", "value": "a2"}, {"from": "human", "value": "q3"},
            {"from": "bard", "value": "a3"}]
    ex = to_example(row({"conversations": conv}), "sharegpt", True)
    assert ex.messages == chat(("system", "s"), ("user", "q1"), ("assistant", "a1"),
                               ("user", "q2"), ("assistant", "a2"), ("user", "q3"),
                               ("assistant", "a3"))


GOOD_CHAT = chat(("user", "q"), ("assistant", "a"))


@pytest.mark.parametrize("fmt, record, field, problem", [
    ("text", {"txt": "x"}, "text", "missing"),
    ("text", {"text": None}, "text", "missing"),
    ("text", {"text": 5}, "text", "expected a string, got int"),
    ("text", {"text": " \n "}, "text", "empty"),
    ("prompt_completion", {"prompt": "p"}, "completion", "missing"),
    ("prompt_completion", {"prompt": None, "completion": "c"}, "prompt", "missing"),
    ("prompt_completion", {"prompt": ["p"], "completion": "c"}, "prompt", "got list"),
    ("prompt_completion", {"prompt": "p", "completion": ""}, "completion", "empty"),
    ("instruction", {"output": "o"}, "instruction", "missing"),
    ("instruction", {"instruction": "i", "input": 3, "output": "o"}, "input", "got int"),
    ("instruction", {"instruction": "i", "output": ""}, "output", "empty"),
    ("messages", {"messages": []}, "messages", "non-empty list"),
    ("messages", {"messages": "hi"}, "messages", "non-empty list"),
    ("messages", {"msgs": GOOD_CHAT}, "messages", "non-empty list"),
    ("messages", {"messages": ["hi", *GOOD_CHAT]}, "messages[0]", "expected an object"),
    ("messages", {"messages": [*GOOD_CHAT, {"role": "robot", "content": "x"}]},
     "messages[2].role", "unknown role 'robot'"),
    ("messages", {"messages": [{"role": "user", "content": 1}, GOOD_CHAT[1]]},
     "messages[0].content", "expected a string, got int"),
    ("messages", {"messages": [{"role": "user"}, GOOD_CHAT[1]]},
     "messages[0].content", "expected a string, got NoneType"),
    ("messages", {"messages": chat(("system", "s"), ("user", "q"))}, "messages", "no assistant turn"),
    ("sharegpt", {"conversations": []}, "conversations", "non-empty list"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]},
     "conversations[0].from", "unknown role 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]},
     "conversations", "no assistant turn"),
])
def test_bad_rows_name_file_line_and_field(fmt, record, field, problem):
    with pytest.raises(DataError) as e:
        to_example(row(record), fmt, True)
    assert (e.value.source, e.value.where, e.value.field) == ("data.jsonl", "line 7", field)
    assert str(e.value).startswith(f"data.jsonl, line 7, field {field!r}: ")
    assert problem in str(e.value)


def test_unknown_role_lists_the_allowed_ones():
    with pytest.raises(DataError, match=r"expected one of \['assistant', 'system', 'user'\]"):
        to_example(row({"messages": [{"role": "bot", "content": "x"}]}), "messages", True)


@pytest.mark.parametrize("fmt, record", [("messages", {"messages": GOOD_CHAT}),
                                         ("sharegpt", {"conversations": [
                                             {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]})])
def test_chat_rows_need_a_chat_template(fmt, record):
    with pytest.raises(DataError) as e:
        to_example(row(record), fmt, has_chat_template=False)
    assert str(e.value).startswith("data.jsonl, line 7: chat rows need a tokenizer with a chat "
                                   "template")


def test_rows_that_are_not_objects():
    with pytest.raises(DataError, match="^data.jsonl, line 7: expected an object, got str"):
        to_example(row("just text"), "text", True)
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        to_example(row({"text": "x"}), "chatml", True)
