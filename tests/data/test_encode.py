"""Loss masks, token by token: the target tokens of every format decode to exactly the
completion / assistant reply plus its end marker, and everything else is masked."""

from __future__ import annotations

import copy
import itertools

import pytest
from tokenizers import processors

from leantune.data.encode import IGNORE, Encoded, encode, prompt_and_reference, render
from leantune.data.formats import Example, to_example
from leantune.data.sources import DataError, Row

from conftest import make_tokenizer

END = "<|im_end|>"  # the test tokenizer's EOS and ChatML end-of-turn marker


@pytest.fixture(scope="module")
def plain():
    """The same BPE tokenizer without a chat template."""
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """A copy whose ``add_special_tokens=True`` prepends ``<s>`` (like Llama's)."""
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


def example(record, fmt, tok, system_prompt=None) -> Example:
    return to_example(Row("data.jsonl", "line 7", record), fmt, tok.chat_template is not None,
                      system_prompt)


def runs(tok, enc: Encoded) -> list[tuple[bool, str]]:
    """``(is_target, decoded text)`` of each maximal run of target / non-target tokens."""
    pairs = zip(enc.input_ids, enc.labels)
    return [(is_target, tok.decode([tid for tid, _ in group]))
            for is_target, group in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE)]


def check_mask(tok, enc: Encoded, text: str, targets: list[str], others: list[str]) -> None:
    assert len(enc.labels) == len(enc.input_ids)
    assert all(label in (tid, IGNORE) for tid, label in zip(enc.input_ids, enc.labels))
    pieces = runs(tok, enc)
    assert [s for is_target, s in pieces if is_target] == targets
    assert [s for is_target, s in pieces if not is_target] == others
    assert "".join(s for _, s in pieces) == text  # the runs tile the whole text, in order


USER_TR = f"<|im_start|>user\nTranslate.{END}\n<|im_start|>assistant\n"
CASES = {
    "text": ({"text": "The quick brown fox."}, "text", "chat",
             ["The quick brown fox." + END], []),
    "prompt_completion": ({"prompt": "What is the capital of France?\n", "completion": "Paris."},
                          "prompt_completion", "chat",
                          ["Paris." + END], ["What is the capital of France?\n"]),
    "instruction_chat": ({"instruction": "Translate.", "output": "hello"}, "instruction", "chat",
                         [f"hello{END}\n"], [USER_TR]),
    "instruction_input_chat": (
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"}, "instruction", "chat",
        [f"hello{END}\n"], [f"<|im_start|>user\nTranslate.\n\nbonjour{END}\n<|im_start|>assistant\n"]),
    "instruction_alpaca": ({"instruction": "Translate.", "output": "hello"}, "instruction", "plain",
                           ["hello" + END], ["### Instruction:\nTranslate.\n\n### Response:\n"]),
    "instruction_input_alpaca": (
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"}, "instruction", "plain",
        ["hello" + END], ["### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n"]),
    "messages": (
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "hello"}, {"role": "assistant", "content": "reply1"},
                      {"role": "user", "content": "thank you"},
                      {"role": "assistant", "content": "reply2"}]}, "messages", "chat",
        [f"reply1{END}\n", f"reply2{END}\n"],
        [f"<|im_start|>system\nBe brief.{END}\n<|im_start|>user\nhello{END}\n<|im_start|>assistant\n",
         f"<|im_start|>user\nthank you{END}\n<|im_start|>assistant\n"]),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "reply1"},
                           {"from": "human", "value": "thank you"},
                           {"from": "chatgpt", "value": "reply2"}]}, "sharegpt", "chat",
        [f"reply1{END}\n", f"reply2{END}\n"],
        [f"<|im_start|>user\nhello{END}\n<|im_start|>assistant\n",
         f"<|im_start|>user\nthank you{END}\n<|im_start|>assistant\n"]),
    # ShareGPT rows may open with an assistant turn: it answers nothing and its role
    # header must never become a target.
    "sharegpt_assistant_first": (
        {"conversations": [{"from": "gpt", "value": "Hello there"},
                           {"from": "human", "value": "hello"}, {"from": "gpt", "value": "reply1"}]},
        "sharegpt", "chat", [f"reply1{END}\n"],
        [f"<|im_start|>assistant\nHello there{END}\n<|im_start|>user\nhello{END}\n"
         "<|im_start|>assistant\n"]),
}


def case(name, tokenizer, plain):
    record, fmt, which, targets, others = CASES[name]
    tok = tokenizer if which == "chat" else plain
    return tok, example(record, fmt, tok), targets, others


@pytest.mark.parametrize("name", list(CASES))
def test_loss_mask_token_by_token(name, tokenizer, plain):
    tok, ex, targets, others = case(name, tokenizer, plain)
    text, _, special = render(ex, tok)
    assert special == (ex.segments is not None)  # chat templates add their own specials
    enc, truncated = encode(ex, tok, max_length=512)
    assert not truncated
    check_mask(tok, enc, text, targets, others)
    # Counted from the target strings alone; position 0 is never predicted.
    n_target_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in targets)
    assert enc.num_targets == n_target_tokens - (enc.labels[0] != IGNORE)


@pytest.mark.parametrize("name", ["text", "prompt_completion", "instruction_alpaca", "messages",
                                  "sharegpt"])
def test_train_on_all(name, tokenizer, plain):
    tok, ex, _, _ = case(name, tokenizer, plain)
    text, _, _ = render(ex, tok)
    assert text.endswith(END) or text.endswith(END + "\n")  # segments get EOS appended
    enc, _ = encode(ex, tok, max_length=512, train_on="all")
    check_mask(tok, enc, text, [text], [])
    assert enc.labels == enc.input_ids


def test_bos_is_never_a_target(bos_tokenizer):
    ex = example(CASES["prompt_completion"][0], "prompt_completion", bos_tokenizer)
    for train_on in ("completion", "all"):
        enc, _ = encode(ex, bos_tokenizer, max_length=512, train_on=train_on)
        assert enc.input_ids[0] == bos_tokenizer.bos_token_id and enc.labels[0] == IGNORE
    text = "<s>What is the capital of France?\nParis." + END
    check_mask(bos_tokenizer, enc, text, [text[3:]], ["<s>"])


def test_truncation_right(tokenizer):
    ex = example(CASES["messages"][0], "messages", tokenizer)
    full, truncated = encode(ex, tokenizer, max_length=512)
    assert not truncated
    n = len(full.input_ids)
    assert encode(ex, tokenizer, max_length=n) == (full, False)  # exactly fits
    for max_length in (n - 1, 20, 1):
        enc, truncated = encode(ex, tokenizer, max_length=max_length)
        assert truncated and len(enc.input_ids) == len(enc.labels) == max_length
        assert enc.input_ids == full.input_ids[:max_length] and enc.labels == full.labels[:max_length]


def test_num_targets_skips_position_zero():
    assert Encoded([5, 6, 7], [5, 6, 7]).num_targets == 2
    assert Encoded([5, 6, 7], [IGNORE, 6, IGNORE]).num_targets == 1
    assert Encoded([5, 6, 7], [5, IGNORE, IGNORE]).num_targets == 0


def test_piecewise_path_matches_offsets(tokenizer, plain, bos_tokenizer, monkeypatch):
    """Without a fast tokenizer the text is tokenized piece by piece at the span bounds;
    where BPE does not merge across those bounds, the result is identical."""
    encs = []
    for name in CASES:
        tok, ex, _, _ = case(name, tokenizer, plain)
        encs.append((tok, ex))
    encs.append((bos_tokenizer, example(CASES["prompt_completion"][0], "prompt_completion",
                                        bos_tokenizer)))
    want = [encode(ex, tok, 512, train_on) for tok, ex in encs for train_on in ("completion", "all")]
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    assert not tokenizer.is_fast and not bos_tokenizer.is_fast and not plain.is_fast
    got = [encode(ex, tok, 512, train_on) for tok, ex in encs for train_on in ("completion", "all")]
    assert got == want


def test_template_that_does_not_render_prefixes(tokenizer):
    """A template whose turns are not prefixes of the conversation cannot be masked by
    rendering prefixes; it must fail loudly, not mask the wrong characters."""
    record = CASES["messages"][0]
    for template in (
        # a marker after the last turn only
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% else %}{{ '<eot>' }}{% endif %}",
        # a generation prompt that differs from the header of a rendered assistant turn
        tokenizer.chat_template.replace("'<|im_start|>assistant\n'",
                                        "'<|im_start|>assistant\n<think>\n'"),
    ):
        assert template != tokenizer.chat_template
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = template
        ex = example(record, "messages", tok)
        with pytest.raises(DataError, match="^data.jsonl, line 7: the chat template does not render "
                                            "turns as prefixes.*data.train_on=all"):
            encode(ex, tok, 512)
        enc, _ = encode(ex, tok, 512, train_on="all")  # the advertised way out works
        assert enc.labels == enc.input_ids


def test_prompt_and_reference(tokenizer, plain):
    tok, ex, _, _ = case("prompt_completion", tokenizer, plain)
    assert prompt_and_reference(ex, tok) == ("What is the capital of France?\n", "Paris.", True)
    tok, ex, _, _ = case("text", tokenizer, plain)
    assert prompt_and_reference(ex, tok) == ("", "The quick brown fox.", True)
    tok, ex, _, _ = case("instruction_input_alpaca", tokenizer, plain)
    assert prompt_and_reference(ex, tok) == (
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n", "hello", True)
    tok, ex, _, others = case("messages", tokenizer, plain)
    assert prompt_and_reference(ex, tok) == (others[0], "reply1", False)
    tok, ex, _, others = case("sharegpt_assistant_first", tokenizer, plain)
    assert prompt_and_reference(ex, tok) == (others[0], "reply1", False)


def test_prompt_and_reference_without_an_answer(tokenizer):
    ex = Example("s", messages=[{"role": "system", "content": "s"},
                                {"role": "assistant", "content": "monologue"}])
    assert prompt_and_reference(ex, tokenizer) is None
