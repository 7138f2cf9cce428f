"""The LM head only where a loss or a score reads it.

A causal LM's head maps every position's hidden state ``[B, T, H]`` to logits
``[B, T, V]``; the loss reads only the positions that predict a target (prompt masking
leaves most positions without one: ~80 % of a multiple-choice row, about half of a chat
exchange), and a choice's score reads only its continuation. :func:`head_at` runs the
head on the selected positions alone, so the model returns logits ``[N, V]``, N the
selected count, in row-major order (``hidden[select]``): the same numbers at those
positions, and their gradients, for ``N / (B T)`` of the head's FLOPs and logits memory
(SmolLM2-135M: the head is ~20 % of a forward; its fp32 logits for 8 x 512 positions are
0.8 GB).

It is a forward pre-hook on ``model.get_output_embeddings()``, which every transformers
causal LM calls on its final hidden states, so it holds through PEFT, ReFT hooks, DDP and
FSDP wrappers. Prompt tuning's ``n`` virtual tokens lengthen the hidden states to
``n + T``; the selection is widened with ``n`` unselected columns in front. A model whose
head is not reached as expected (no output embeddings, another first argument) is left
alone and returns its full logits: callers check the logits' rank.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_EVERYWHERE: weakref.WeakSet = weakref.WeakSet()  # heads :func:`run_everywhere` set free


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns hidden states into logits, through DDP / DeepSpeed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel, DeepSpeedEngine
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        head = None
    return head if isinstance(head, torch.nn.Module) else None


def run_everywhere(model: torch.nn.Module) -> None:
    """From now on ``model``'s head runs at every position: :func:`head_at` leaves it
    alone (for a model whose code after the head needs the full ``[B, T, V]``)."""
    head = output_head(model)
    if head is not None:
        _EVERYWHERE.add(head)


@contextmanager
def head_at(model: torch.nn.Module, select: torch.Tensor | None,
            capture: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, ``model``'s head runs only where ``select`` ``[B, T]`` (bool) is
    True and returns ``[N, V]`` (``select`` None: everywhere, ``[B, T, V]``).

    With ``capture`` (a list), the selected hidden states ``[N, H]`` are appended to it
    instead and the head runs on none of them (logits ``[0, V]``): for a loss that applies
    the head itself, chunk by chunk (:mod:`leantune.model.chunked_loss`). ``capture``
    stays empty when the head is not reached as expected."""
    head = output_head(model) if select is not None else None
    if head is None or head in _EVERYWHERE:
        yield
        return

    def pre(_module, args):
        if not args or not torch.is_tensor(args[0]) or args[0].dim() != 3:
            return None
        hidden, mask = args[0], select.to(args[0].device)
        extra = hidden.shape[1] - mask.shape[1]  # prompt tuning's virtual tokens
        if hidden.shape[0] != mask.shape[0] or extra < 0:
            return None
        if extra:
            mask = F.pad(mask, (extra, 0), value=False)
        picked = hidden[mask]
        if capture is not None:
            capture.append(picked)
            picked = picked[:0]
        return (picked, *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()
