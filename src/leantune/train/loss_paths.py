"""The loss's two shortcuts, checked on the run's own first examples before step 1 and
switched off for a model where they do not hold.

- **Head at target positions** (:mod:`leantune.train.head`): the LM head runs only where
  a loss reads it, returning ``[N, V]``. A model whose code after the head needs the
  full ``[B, T, V]`` (a reshape, a slice along the sequence) fails or differs.
- **Chunked loss** (:mod:`leantune.train.chunked_loss`): the head and the cross-entropy
  together, chunk by chunk. A model that transforms its logits after the head (Gemma-2's
  soft-capping, Cohere's logit scale) differs.

Each is compared with the model's own full-logits loss (head at every position, then
``F.cross_entropy``) on the same examples; a shortcut that raises, or whose summed loss
differs by more than 1e-4 relative (fp32; 1e-3 in half precision), is switched off for
the model with one log line saying why, and the run goes on without it. Rounding alone
is ~4e-6 (SmolLM2-135M, fp32, 439 targets); the transforms the check exists for move
the loss by percents.

The examples are cut to at most :data:`CHECK_TOKENS` tokens each, ending at their last
target, so the full-logits reference (``[B, T, V]`` in fp32) stays small at any
``max_length`` and vocabulary.
"""

from __future__ import annotations

import logging

import torch

from leantune.data.collate import collate_padded
from leantune.data.encode import IGNORE, Encoded
from leantune.model import first_line
from leantune.train.chunked_loss import chunked_head, turn_off
from leantune.train.head import run_everywhere
from leantune.train.step import forward_loss

log = logging.getLogger(__name__)

CHECK_TOKENS = 128  # per example: enough for every layer's code path, small logits


def check_batch(examples: list[Encoded], pad_id: int, intervene: tuple[int, int] | None
                ) -> dict[str, torch.Tensor]:
    """``examples`` cut to the :data:`CHECK_TOKENS` tokens that end at each one's last
    target (every cut example keeps a target), collated padded."""
    cut = []
    for e in examples:
        end = max((i for i, t in enumerate(e.labels) if t != IGNORE), default=len(e.labels) - 1)
        start = max(0, end + 1 - CHECK_TOKENS)
        cut.append(Encoded(e.input_ids[start:end + 1], e.labels[start:end + 1]))
    return collate_padded(cut, pad_id, intervene)


def _off(what: str, reason: str) -> dict:
    log.warning("%s: off, %s", what, reason)
    return {"used": False, "reason": reason, "difference": None}


def _compare(loss_fn, reference: torch.Tensor, tolerance: float, what: str) -> dict:
    """Whether ``loss_fn()`` runs and equals ``reference`` within ``tolerance``."""
    try:
        loss = loss_fn()
    except Exception as e:  # noqa: BLE001 - a shortcut that fails is left out, not fatal
        return _off(what, f"it fails on this model ({type(e).__name__}: {first_line(e)})")
    difference = float((loss - reference).abs() / reference.abs().clamp_min(1e-12))
    if not difference <= tolerance:
        record = _off(what, f"it differs from the model's own loss by {difference:.1e} "
                            f"(> {tolerance:.0e}): the model transforms its logits after "
                            "the head")
        return record | {"difference": difference}
    return {"used": True, "reason": None, "difference": difference}


def check_loss_paths(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     dtype: torch.dtype, chunked: bool | str = True) -> dict[str, dict]:
    """Check both shortcuts on ``batch`` (no gradients) and switch off what fails.

    Args:
        dtype: the run's compute dtype (its tolerance: 1e-4 fp32, else 1e-3).
        chunked: whether the chunked loss is wanted, or the reason it is not (a string).

    Returns:
        ``{"head_at_targets": r, "chunked_loss": r}``, each ``r`` being
        ``{"used", "reason", "difference"}``.
    """
    tolerance = 1e-4 if dtype == torch.float32 else 1e-3
    with torch.no_grad():
        _, full, _ = forward_loss(model, batch, full_logits=True)
        head = _compare(lambda: forward_loss(model, batch)[1], full, tolerance,
                        "the LM head at target positions only")
        if not head["used"]:
            run_everywhere(model)
        if chunked is not True:
            chunks = {"used": False, "reason": chunked or "train.chunked_loss=false",
                      "difference": None}
        elif not head["used"]:
            chunks = {"used": False, "difference": None,
                      "reason": "the LM head cannot run at target positions only"}
        elif chunked_head(model) is None:
            chunks = {"used": False, "reason": "the LM head is not a plain nn.Linear",
                      "difference": None}
        else:
            chunks = _compare(lambda: forward_loss(model, batch, chunked=True)[1], full,
                              tolerance, "train.chunked_loss")
    if not chunks["used"]:
        turn_off(model)
    return {"head_at_targets": head, "chunked_loss": chunks}
