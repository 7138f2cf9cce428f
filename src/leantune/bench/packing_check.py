"""An independent check of packing: every example's loss and the gradients of every
trainable weight, packed rows against padded ones, on layouts chosen to be hard.

It shares no code with leantune's packing probe (:mod:`leantune.packing.probe`) but the
collators, so that ``leantune bench architectures`` can tell a probe that passes wrongly
(a silent contamination) from a model that really packs exactly.
"""

from __future__ import annotations

import copy

import torch

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig, ConfigError
from leantune.data.encode import IGNORE, Encoded
from leantune.model.load import first_line
from leantune.packing.collate import collate_packed, collate_padded

MAX_LENGTH = 128  # the rows' width (data.max_length of the tiny runs)


def examples(vocab: int, lengths: list[int], seed: int) -> list[Encoded]:
    """Random examples of ``lengths`` tokens (ids 5 and up: no special tokens), the first
    third of each a prompt (no targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def loss_by_example(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    spans: list[tuple[int, int, int]]) -> tuple[list[float], list[torch.Tensor]]:
    """Each example's summed target loss and the gradient of their sum.

    Args:
        batch: ``input_ids``, ``labels`` ``[rows, width]`` (and the attention mask or
            ``position_ids`` the layout has).
        spans: each example's ``(row, offset, length)`` in the batch.

    Returns:
        The losses, one per span, and the gradients of every trainable weight that has one
        (none where the forward builds no graph, as Reformer's eval mode does).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logp = torch.log_softmax(model(**inputs, use_cache=False).logits.float(), -1)
    losses = []
    for r, o, n in spans:
        labels = batch["labels"][r, o + 1:o + n]
        tok = logp[r, o:o + n - 1].gather(-1, labels.clamp_min(0)[:, None])[:, 0]
        losses.append(-(tok * (labels != IGNORE)).sum())
    total = torch.stack(losses).sum()
    if total.grad_fn is None:
        return [float(x) for x in losses], []
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [float(x.detach()) for x in losses], [g for g in grads if g is not None]


def independent_check(model: torch.nn.Module, vocab: int, max_length: int = MAX_LENGTH) -> dict:
    """Worst relative differences of packed from padded rows over three hard layouts: a
    pad tail longer than every example; full rows of 8 short examples each; one example
    per row but for a last row of two. Shares no code with leantune's probe but the
    collators.

    Returns:
        ``{"loss", "grads", "finite", "exact"}``: the worst relative loss and gradient
        differences, whether packed losses and gradients are all finite, and whether
        packing is exact (finite, loss < 1e-4 and gradients < 1e-3).
    """
    hard = [([40, 40, 40, 6], [[0, 1, 2], [3]]),
            ([max_length // 8] * 16, [list(range(8)), list(range(8, 16))]),
            ([max_length - 20, max_length - 30, 11, 9], [[0], [1], [2, 3]])]
    worst_loss, worst_grad, finite = 0.0, 0.0, True
    for k, (lengths, bins) in enumerate(hard):
        ex = examples(vocab, lengths, seed=100 + k)
        ref, g_ref = loss_by_example(model, collate_padded(ex, pad_id=0),
                                     [(i, 0, n) for i, n in enumerate(lengths)])
        spans = {}
        for r, b in enumerate(bins):
            offset = 0
            for i in b:
                spans[i] = (r, offset, lengths[i])
                offset += lengths[i]
        got, g_got = loss_by_example(model, collate_packed(ex, bins, pad_id=0),
                                     [spans[i] for i in range(len(ex))])
        finite &= all(torch.isfinite(torch.tensor(got))) and all(g.isfinite().all() for g in g_got)
        worst_loss = max(worst_loss, max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(got, ref)))
        num = sum(float((a - b).double().square().sum()) for a, b in zip(g_got, g_ref))
        den = sum(float(b.double().square().sum()) for b in g_ref)
        worst_grad = max(worst_grad, (num / den) ** 0.5 if den else 0.0)
    return {"loss": worst_loss, "grads": worst_grad, "finite": bool(finite),
            "exact": bool(finite) and worst_loss < 1e-4 and worst_grad < 1e-3}


def check_method(model: torch.nn.Module, method: str, vocab: int) -> dict:
    """:func:`independent_check` on a copy of ``model`` as ``method`` trains it: every
    weight for ``full``; LoRA on its default targets, B randomized, for ``lora``."""
    model = copy.deepcopy(model)
    if method == "lora":
        try:
            model = build_adapter(AdapterConfig(method="lora", dropout=0.0)).apply(model)
        except ConfigError as e:  # the run is refused too
            return {"error": f"LoRA refused: {first_line(e)}"}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.eval()  # no dropout: both layouts must compute the same function
    try:
        return independent_check(model, vocab)
    except Exception as e:  # noqa: BLE001 - recorded: the run's verdict stands unconfirmed
        return {"error": f"{type(e).__name__}: {first_line(e)[:300]}"}
