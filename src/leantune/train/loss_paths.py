"""Before step 1, on the run's own first examples: that the model trains in the chosen
precision (:func:`check_trains`), and the loss's two shortcuts, switched off for a model
where they do not hold (:func:`check_loss_paths`).

A model that fails one training forward and backward under bf16 autocast but runs in
fp32 (a kernel without a bf16 path, such as DBRX's expert ``index_add_``) trains in fp32
when ``train.precision=auto`` chose bf16, with one warning; asked for explicitly, bf16 is
refused in one line. A model that fails in fp32 too cannot train on this data at all:
one line naming the error and where it was raised, not a traceback.

- **Head at target positions** (:mod:`leantune.model.head`): the LM head runs only where
  a loss reads it, returning ``[N, V]``. A model whose code after the head needs the
  full ``[B, T, V]`` (a reshape, a slice along the sequence) fails or differs.
- **Chunked loss** (:mod:`leantune.model.chunked_loss`): the head and the cross-entropy
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
import traceback
from pathlib import Path

import torch
from peft import PeftModel

from leantune.config import ConfigError
from leantune.data.encode import IGNORE, Encoded
from leantune.model.chunked_loss import chunked_head, turn_off
from leantune.model.head import run_everywhere
from leantune.model.load import ModelError, evaluating, first_line
from leantune.model.logprobs import full_nll, target_logprobs
from leantune.model.precision import Precision, fall_back, fp32_obstacle, in_fp32, to_fp32
from leantune.model.rounding import tolerance_for
from leantune.packing.collate import collate_padded

log = logging.getLogger(__name__)

CHECK_TOKENS = 128  # per example: enough for every layer's code path, small logits


def check_batch(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """``examples`` cut to the :data:`CHECK_TOKENS` tokens that end at each one's last
    target (every cut example keeps a target), collated padded."""
    cut = []
    for e in examples:
        end = max((i for i, t in enumerate(e.labels) if t != IGNORE), default=len(e.labels) - 1)
        start = max(0, end + 1 - CHECK_TOKENS)
        cut.append(Encoded(e.input_ids[start:end + 1], e.labels[start:end + 1]))
    return collate_padded(cut, pad_id)


def _trains(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Why one training-mode forward and backward of ``batch`` fails (the error and the
    last frame), or None when it runs. Gradients are dropped and the RNG restored."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with evaluating(model, training=True), torch.random.fork_rng(devices=devices):
        try:
            full_nll(model, batch)[1].backward()
        except Exception as e:  # noqa: BLE001 - what fails is reported, in one line
            frame = traceback.extract_tb(e.__traceback__)[-1]
            return (f"{type(e).__name__}: {first_line(e)} "
                    f"({Path(frame.filename).name}:{frame.lineno})")
        finally:
            model.zero_grad(set_to_none=True)
    return None


def check_trains(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 precision: Precision, device: torch.device) -> Precision:
    """The precision the run trains in (see the module docstring): ``precision``, or fp32
    when ``auto`` chose bf16 and the model fails under it but not in fp32 (then ``model``
    computes in fp32 from here on).

    Raises:
        ModelError: the model fails one training step on ``batch`` in fp32 too.
        ConfigError: bf16 was asked for and fails, or the fp32 fallback is impossible.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    name = type(base).__name__
    error = _trains(model, batch)
    if error is None:
        return precision
    obstacle = fp32_obstacle(model) if precision.used != "fp32" else None
    if precision.used != "fp32" and obstacle is None:
        with in_fp32(model):
            fails_in_fp32 = _trains(model, batch)
    else:
        fails_in_fp32 = error if precision.used == "fp32" else None
    if fails_in_fp32:
        raise ModelError(f"{name} cannot train on this run's first examples: one forward and "
                         f"backward fails ({fails_in_fp32})")
    if precision.requested != "auto" or obstacle is not None:
        raise ConfigError(f"train.precision={precision.requested}: {name} fails under bf16 "
                          f"({error}); {obstacle or 'it runs in fp32'}: use "
                          "train.precision=fp32")
    reason = f"{name} fails under bf16 autocast ({error}) and runs in fp32"
    log.warning("train.precision=auto: %s; training in fp32", reason)
    to_fp32(model)
    return fall_back(precision, reason, device)


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
    # The shortcuts sum the same terms in another order: never held tighter than 1e-4.
    tolerance = max(tolerance_for(dtype).loss, 1e-4)
    with torch.no_grad():
        _, full = full_nll(model, batch)
        head = _compare(lambda: -target_logprobs(model, batch).sum(), full, tolerance,
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
            chunks = _compare(lambda: -target_logprobs(model, batch, chunked=True).sum(), full,
                              tolerance, "train.chunked_loss")
    if not chunks["used"]:
        turn_off(model)
    return {"head_at_targets": head, "chunked_loss": chunks}
