"""Multiple-choice requests tokenized as lm-evaluation-harness tokenizes them for a causal
LM: trailing spaces of the context move to the continuation, ``whole = tok(context +
continuation)``, ``ctx = tok(context)``, and the continuation is ``whole[len(ctx):]``."""

from __future__ import annotations

from leantune.data.encode import IGNORE, Encoded
from leantune.data.tasks import ChoiceDoc


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` split as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def requests(docs: list[ChoiceDoc], tokenizer, max_length: int) -> list[Encoded]:
    """One :class:`Encoded` per (document, choice), in order: labels are the continuation's
    ids, -100 over the context."""
    out = []
    for d in docs:
        for context, continuation in zip(d.contexts, d.continuations, strict=True):
            ctx, cont = encode_pair(tokenizer, context, continuation)
            ids = (ctx + cont)[-max_length:]
            n_cont = min(len(cont), len(ids) - 1)  # the first token is never predicted
            out.append(Encoded(ids, [IGNORE] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]))
    return out
