"""The frozen reference of DPO, IPO and KTO: where its log-probs come from.

``objective.reference``:

- ``adapter_off``: the policy itself with its adapter switched off
  (:meth:`~leantune.adapters.base.Adapter.disabled`), no second model: an extra forward
  without gradient per batch, no extra memory. Exact, since the adapter is the only
  thing that trains.
- ``copy``: a frozen copy of the starting weights (what full fine-tuning needs for a live
  reference): an extra forward per batch and a second model in memory.
- ``cached``: the reference's summed log-probs of every training completion computed
  once, before the first step, kept in the run directory
  (:mod:`leantune.train.reference_cache`) and carried by the batches (``ref_logps``):
  no reference forward during training at all, and none after a resume.

Held-out and Fast Forward sets always cache theirs (they are fixed, and so are their
reference log-probs), whatever the mode.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from leantune.model.logprobs import sequence_logprobs


class Reference(ABC):
    """Computes the reference's summed completion log-probs of a collated batch."""

    kind: str = ""

    @abstractmethod
    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool
              ) -> torch.Tensor:
        """``[E]`` per sequence of ``batch`` (no gradient), in the collated order."""


class AdapterOff(Reference):
    """The policy with its adapter switched off: ``disabled(model)`` is the context."""

    kind = "adapter_off"

    def __init__(self, disabled: Callable[[torch.nn.Module], AbstractContextManager]):
        self.disabled = disabled

    def logps(self, model, batch, chunked):
        inner = getattr(model, "module", model)  # DDP's wrapper holds the adapter's model
        with torch.no_grad(), self.disabled(inner):
            return sequence_logprobs(inner, batch, chunked)[0]


class FrozenCopy(Reference):
    """A copy of ``model`` as it is now, frozen (gradient off, eval mode: no dropout, as
    TRL keeps its reference model); with ``disabled`` (an adapter's switch) the
    copy computes with its adapter off: the base."""

    kind = "copy"

    def __init__(self, model: torch.nn.Module,
                 disabled: Callable[[torch.nn.Module], AbstractContextManager] | None = None):
        self.model = copy.deepcopy(model)
        self.disabled = disabled
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logps(self, model, batch, chunked):
        with torch.no_grad(), (self.disabled(self.model) if self.disabled else nullcontext()):
            return sequence_logprobs(self.model, batch, chunked)[0]


class Cached(Reference):
    """Log-probs computed before training; batches carry them as ``ref_logps``."""

    kind = "cached"

    def logps(self, model, batch, chunked):
        raise RuntimeError("objective.reference=cached: this batch carries no ref_logps (the "
                           "cache was not filled before training)")


def reference_logps(reference: Reference, model: torch.nn.Module,
                    batch: dict[str, torch.Tensor], chunked: bool) -> torch.Tensor:
    """The batch's own ``ref_logps`` where it carries them, else ``reference``'s."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    return reference.logps(model, batch, chunked)


def as_reference(reference) -> Reference | None:
    """A :class:`Reference`, or a context factory ``disabled(model)`` taken as
    :class:`AdapterOff`."""
    if reference is None or isinstance(reference, Reference):
        return reference
    return AdapterOff(reference)
