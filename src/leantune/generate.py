"""Batched greedy (or sampled) generation with a base model plus adapter."""

from __future__ import annotations

import torch

from leantune.model import evaluating


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
