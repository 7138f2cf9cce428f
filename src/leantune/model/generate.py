"""Batched greedy (or sampled) generation with a base model plus adapter, and prompts
given as text or chat messages rendered for it."""

from __future__ import annotations

import torch

from leantune.config import ConfigError
from leantune.model.load import evaluating


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             add_special_tokens: bool = False, batch_size: int = 8,
             temperature: float = 0.0) -> list[str]:
    """Replies to ``prompts`` (already rendered, e.g. with the chat template).

    Prompts are left-padded so that every row's last prompt token sits at the same
    position; ``temperature == 0`` is greedy decoding.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature} if temperature > 0
                else {"do_sample": False})
    replies = []
    try:
        with evaluating(model):
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt",
                                padding=True, add_special_tokens=add_special_tokens).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
                new = out[:, enc["input_ids"].shape[1]:]
                replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def render_prompt(row: dict, tokenizer, raw: bool = False) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` for a ``{"prompt": ...}`` or ``{"messages": [...]}`` row."""
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                             add_generation_prompt=True), False
    if not isinstance(row.get("prompt"), str):
        raise ConfigError(f"a prompt row needs a 'prompt' string or 'messages'; got {row!r}")
    if raw or tokenizer.chat_template is None:
        return row["prompt"], True
    messages = [{"role": "user", "content": row["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def answer_prompts(model, tokenizer, rows: list[dict], max_new_tokens: int,
                   temperature: float = 0.0, raw: bool = False) -> list[str]:
    """Replies to every row, batched by how the prompt is tokenized."""
    rendered = [render_prompt(r, tokenizer, raw) for r in rows]
    return generate_rendered(model, tokenizer, rendered, max_new_tokens, temperature=temperature)


def generate_rendered(model, tokenizer, rendered: list[tuple[str, bool]], max_new_tokens: int,
                      batch_size: int = 8, temperature: float = 0.0) -> list[str]:
    """Replies to ``(text, add_special_tokens)`` prompts, in their order; prompts are
    batched with others tokenized the same way."""
    replies = [""] * len(rendered)
    for special in (False, True):
        idx = [i for i, (_, s) in enumerate(rendered) if s == special]
        if idx:
            out = generate(model, tokenizer, [rendered[i][0] for i in idx], max_new_tokens,
                           special, batch_size, temperature)
            for i, reply in zip(idx, out, strict=True):
                replies[i] = reply
    return replies
