"""Sampling ``G`` completions per prompt from the model being trained: GRPO's rollouts.

The fast path (:func:`sample`) is a decode loop of its own on the model's KV cache:

1. the prompts, left-padded, run once (prefill), keeping only the last position's
   logits; the cache is then repeated ``G`` times along the batch
   (``batch_repeat_interleave``), so a prompt's keys and values are computed once per
   group, not once per completion as ``generate(num_return_sequences=G)`` does;
2. each step samples one token per live row (temperature, top-p, a seeded
   ``torch.Generator``, so the same seed gives the same completions; one uniform per row
   against the cumulative distribution, as ``torch.multinomial``'s one exponential per
   vocabulary entry costs more than the model's step at SmolLM2's 49k vocabulary) and
   feeds it back;
   rows that reached a stop token or the length cap leave the batch
   (``batch_select_indices``), so a step costs what the live rows cost.

The adapter stays unmerged: the model samples as it trains, and no weights are copied.
Models whose forward cannot take a cache this way (ReFT edits prompt positions through
``generate``; prompt tuning prepends virtual tokens) go through transformers'
``generate`` with the same sampling settings (:func:`sample_with_generate`).

Completions are token ids, each ending with its stop token where it met one (as TRL's
completion mask keeps the EOS token) and at most ``max_new`` long.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache

from leantune.model.load import evaluating


def fast_path(model: torch.nn.Module) -> bool:
    """Whether :func:`sample` can drive ``model`` (else :func:`sample_with_generate`)."""
    inner = getattr(model, "module", model)
    if getattr(inner, "batch_inputs", ()):  # ReFT: edits need its own generate
        return False
    peft_config = getattr(inner, "peft_config", None)
    if peft_config:
        return not any(getattr(c, "is_prompt_learning", False) for c in peft_config.values())
    return True


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` where the model's class takes it
    (transformers >= 5.2x renamed ``past_key_values``), else ``past_key_values``."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def uniforms(rows: int, generator, owners: torch.Tensor | None, device) -> torch.Tensor:
    """``[rows, 1]`` float64 uniforms: from ``generator``, or (a list, one per prompt) each
    row's from its prompt's (``owners``: each row's prompt), so a prompt's draws do not
    depend on which other prompts share the batch."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand((rows, 1), generator=generator, device=device, dtype=torch.float64)
    u = torch.empty((rows, 1), dtype=torch.float64, device=device)
    for g in owners.unique().tolist():
        at = (owners == g).nonzero().squeeze(-1)
        u[at] = torch.rand((len(at), 1), generator=generator[g], device=device,
                           dtype=torch.float64)
    return u


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator,
         owners: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` tokens drawn from ``logits`` ``[B, V]``: greedy at temperature 0, else from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose mass
    reaches ``top_p`` (the most likely token always stays); ``generator`` one, or one per
    prompt with ``owners`` (:func:`uniforms`)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Inverse-CDF: one uniform per row against the cumulative distribution.
    # torch.multinomial draws an exponential per vocabulary entry (3M per step at 64 rows x
    # SmolLM2's 49,152 tokens: two thirds of a decode step's time on CPU).
    cdf = probs.double().cumsum(-1)
    u = uniforms(len(probs), generator, owners, probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[P, L]``, each prompt right-aligned."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: list[list[int]], num: int, max_new: int,
           temperature: float, top_p: float, stop: set[int], pad_id: int,
           generator=None, synced: Callable[[bool], bool] | None = None) -> list[list[int]]:
    """``len(prompts) * num`` completions, prompt by prompt (prompt i's are
    ``[i * num, (i + 1) * num)``), sampled as the module docstring says; ``generator``:
    one ``torch.Generator``, or one per prompt (each prompt's completions then depend on
    its own seed only, whichever prompts it is batched with, up to the rounding of a
    batch of another shape).

    ``synced``: for a model whose every forward is collective (FSDP2 shards), called
    once per step with whether this process needs another forward; it returns whether
    any process does. A process whose rows are all done then runs a one-token forward
    per step until every process is done, so all of them run the same forwards (as
    transformers' ``generate(synced_gpus=True)`` does, which the fallback uses).
    ``prompts`` must not be empty."""
    if not fast_path(model):
        return sample_with_generate(model, prompts, num, max_new, temperature, top_p, stop,
                                    pad_id, generator, synced=synced is not None)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    kv = {cache_keyword(model): cache, "use_cache": True}
    with evaluating(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                       logits_to_keep=1, **kv).logits[:, -1]
        if num > 1:
            cache.batch_repeat_interleave(num)
            logits, mask = logits.repeat_interleave(num, 0), mask.repeat_interleave(num, 0)
        position = position[:, -1:].repeat_interleave(num, 0)
        out: list[list[int]] = [[] for _ in range(len(prompts) * num)]
        live = torch.arange(len(out), device=device)
        stops = torch.tensor(sorted(stop), device=device)
        for step in range(max_new):
            if len(live):
                token = pick(logits, temperature, top_p, generator, live // num)
                for row, t in zip(live.tolist(), token.tolist()):
                    out[row].append(t)
                going = ~torch.isin(token, stops)
            more = step < max_new - 1 and len(live) > 0 and bool(going.any())
            if not (synced(more) if synced is not None else more):
                break
            if not more:  # done here, not elsewhere: keep FSDP's all-gathers in step
                live = live[:0]
                model(input_ids=ids[:1, -1:])
                continue
            if not going.all():  # finished rows leave the batch (and the cache)
                keep = going.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, token, mask, position = live[keep], token[keep], mask[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            position = position + 1
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                           **kv).logits[:, -1]
    return out


@torch.no_grad()
def sample_with_generate(model: torch.nn.Module, prompts: list[list[int]], num: int,
                         max_new: int, temperature: float, top_p: float, stop: set[int],
                         pad_id: int, generator=None, synced: bool = False
                         ) -> list[list[int]]:
    """:func:`sample` through transformers' ``generate`` (every completion computes its
    prompt). Its sampling draws from the global RNG, seeded here from ``generator``;
    ``synced``: ``generate``'s ``synced_gpus`` (every process runs until all are done)."""
    device = next(model.parameters()).device
    if isinstance(generator, (list, tuple)):
        generator = generator[0] if generator else None
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    out: list[list[int]] = []
    with evaluating(model), torch.random.fork_rng(devices=[device] if device.type == "cuda"
                                                   else []):
        if seed is not None:
            torch.manual_seed(seed)
        ids, mask = left_pad([p for p in prompts for _ in range(num)], pad_id, device)
        settings = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                    if temperature > 0 else {"do_sample": False})
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             pad_token_id=pad_id,
                             eos_token_id=sorted(stop), use_cache=True,
                             synced_gpus=synced, **settings)
        new = new[:, ids.shape[1]:]
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:cut])
    return out
