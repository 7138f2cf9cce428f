"""Two layouts of the same examples, run through the model and compared: the measurement
behind the packing probe (:mod:`leantune.packing.probe`).

A *layout* is a list of ``(batch, spans)``: collated batches and, for each example in
order, the ``(row, offset, length)`` where its tokens sit in its batch. Three layouts of
the examples of packed ``rows``:

- ``packed``: the rows as training lays them out (positions restarting at every example,
  no attention mask, pad tails as segments of their own);
- ``padded``: one example per row, right-padded, with an attention mask (the reference);
- ``alone``: each example in a batch of its own, no padding at all. Padded against alone
  differs by rounding only (other matmul shapes, other masks, no packing), which makes it
  the noise floor of a precision where rounding is coarse (bf16).

:func:`compare_layouts` measures, of ``got`` against the padded reference:

- ``logits``: ``max |Δ logits| / max |logits|`` over every real token;
- ``loss``: ``|Δ L| / |L|`` for the summed target cross-entropy ``L``;
- ``grads``: ``||Δ g|| / ||g||`` over every trainable tensor after one backward of ``L``
  (summed over processes), and whether loss and gradients are finite.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from leantune.data.encode import Encoded
from leantune.model.load import first_line
from leantune.model.logprobs import full_nll
from leantune.packing.collate import collate_padded, collate_rows

Rows = list[list[Encoded]]  # the examples of each row of one packed micro-batch
Spans = list[tuple[int, int, int]]  # (row, offset, length) of each example, in order
Layout = list[tuple[dict[str, torch.Tensor], Spans]]


def layout(kind: str, rows: Rows, pad_id: int) -> Layout:
    """The examples of ``rows`` laid out as ``kind``: packed, padded or alone (see the
    module docstring)."""
    flat = [e for r in rows for e in r]
    if kind == "padded":
        return [(collate_padded(flat, pad_id),
                 [(i, 0, len(e.input_ids)) for i, e in enumerate(flat)])]
    if kind == "alone":
        return [(collate_padded([e], pad_id), [(0, 0, len(e.input_ids))])
                for e in flat]
    spans = []
    for r, row in enumerate(rows):
        offset = 0
        for e in row:
            spans.append((r, offset, len(e.input_ids)))
            offset += len(e.input_ids)
    return [(collate_rows(rows, pad_id), spans)]


def run_layout(model: torch.nn.Module, batches: Layout, backward: bool
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Real-token logits (one tensor, in example order), the summed loss, and the summed
    gradients of the trainable parameters over the layout's batches (None without
    ``backward``, or when the model's eval-mode forward builds no graph, as Reformer's
    reversible layers do).

    The parameters are read after each backward, never before a forward: FSDP2 swaps the
    root module's sharded parameters for unsharded ones from its forward until its
    backward, so a list taken in between would clear stale tensors and leave the probe's
    gradients on the sharded ones, to be added into the first training step."""
    device = next(model.parameters()).device
    real, total, grads = [], torch.zeros((), device=device), None
    for batch, spans in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.set_grad_enabled(backward):
            logits, loss = full_nll(model, batch)
            real += [logits[r, o:o + n].float().detach() for r, o, n in spans]
            total = total + loss.detach().float()
            if backward and loss.grad_fn is not None:
                loss.backward()
                trainable = [p for p in model.parameters() if p.requires_grad]
                step = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                        for p in trainable]
                grads = step if grads is None else [a + b for a, b in zip(grads, step)]
                model.zero_grad(set_to_none=True)
    return torch.cat(real), total, grads


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP-sharded) tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def compare_layouts(model: torch.nn.Module, rows: Rows, pad_id: int, backward: bool,
                    acc: Accelerator | None = None, got: str = "packed") -> dict:
    """The ``got`` layout (packed, or alone for a noise floor) against padded, on the
    examples of ``rows`` (see the module docstring).

    Returns:
        ``{"logits", "loss", "grads"}`` relative errors (``grads`` None without a
        backward), ``finite`` / ``padded_finite``: whether each layout's loss and
        gradients are finite, and ``backward``; or only ``{"error"}`` when the ``got``
        forward raises (padded runs first: what it raises propagates).
    """
    ref, ref_loss, ref_grads = run_layout(model, layout("padded", rows, pad_id), backward)
    backward = ref_grads is not None
    try:
        out, out_loss, out_grads = run_layout(model, layout(got, rows, pad_id), backward)
    except Exception as e:  # noqa: BLE001 - the padded layout ran: the layout is the cause
        return {"error": f"{type(e).__name__}: {first_line(e)}"}
    sums = torch.zeros(4, dtype=torch.float64, device=ref.device)  # |Δg|², |g|², bad g: both
    for a, b in zip(out_grads or [], ref_grads or []):
        a, b = _local(a).double(), _local(b).double()
        sums += torch.stack([(a - b).square().sum(), b.square().sum(),
                             (~a.isfinite()).sum().double(), (~b.isfinite()).sum().double()])
    if acc is not None and acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
    d2, g2, bad, ref_bad = sums.tolist()
    return {
        "logits": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)),
        "loss": float((out_loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)),
        "grads": math.sqrt(d2 / g2) if backward and g2 > 0 else (0.0 if backward else None),
        "finite": bool(out_loss.isfinite()) and bad == 0,
        "padded_finite": bool(ref_loss.isfinite()) and ref_bad == 0,
        "backward": backward, "error": None,
    }


def worst(results: list[dict]) -> dict:
    """Over :func:`compare_layouts` results: the largest error of each kind (None where
    none was measured), whether every layout was finite, every backward ran, and the
    first forward error."""
    errors = [r["error"] for r in results if r["error"] is not None]
    ok = [r for r in results if r["error"] is None]
    return {"errors": {k: max((r[k] for r in ok if r[k] is not None), default=None)
                       for k in ("logits", "loss", "grads")},
            "finite": all(r["finite"] for r in ok),
            "padded_finite": all(r["padded_finite"] for r in ok),
            "backward": all(r["backward"] for r in ok), "error": errors[0] if errors else None}
