"""What every adapter method provides, so the loop, checkpoints, generation and export
never branch on the method: how it wraps a base model, how its weights persist, and the
few facts the pipeline needs about it (packing, virtual tokens, merging, quantization).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.config import AdapterConfig
from leantune.model.flops import logical_numel
from leantune.model.load import evaluating


class NotMergeable(ValueError):
    """The method has no weights to fold into the base (the message says what to do)."""


class Adapter:
    """One adapter method, built from ``adapter.*`` config fields.

    ``apply`` leaves exactly the method's parameters trainable; ``save`` writes weights
    and config together to a directory (so they round-trip); ``load`` rebuilds the
    adapted model on a fresh base from such a directory; ``load_weights`` restores weights
    into an already adapted model (checkpoint resume); ``merge`` folds the adapter into
    the base and returns a plain transformers model.

    Class attributes:
        output_name: the run directory's subdirectory (``adapter`` or ``model``).
        packs: packed rows (several examples per row, restarting positions) keep the
            method exact. False where the method adds tokens to each row, not example.
        merge_note: printed by ``leantune export`` when merging is not a plain fold.
    """

    name = "adapter"
    output_name = "adapter"
    packs = True
    merge_note: str | None = None

    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg

    @property
    def virtual_tokens(self) -> int:
        """Positions the method prepends to every row (they cost compute, not data)."""
        return 0

    def quantization(self, compute_dtype: torch.dtype) -> Any | None:
        """A ``BitsAndBytesConfig`` the base must be loaded with, or None."""
        return None

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Make a freshly loaded base ready for ``apply`` (e.g. k-bit training prep)."""
        return model

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """Write the adapter (or model) to ``directory``; ``state_dict``: the model's full
        state dict when its parameters are sharded (FSDP, DeepSpeed ZeRO-3), gathered by
        ``Accelerator.get_state_dict``."""
        raise NotImplementedError

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        """Within the block ``model`` computes as its base, the adapter switched off: a
        preference loss's reference without a second model. Raises NotImplementedError
        where the method has no such switch (full fine-tuning changes the base itself)."""
        raise NotImplementedError(f"adapter.method={self.name} has no base to switch back to")

    def merge_base(self, base: nn.Module) -> nn.Module:
        """The base to merge into (QLoRA dequantizes its 4-bit base here)."""
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeable(f"adapter.method={self.name} cannot be merged into the base model")


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, a tied weight once."""
    return list({id(p): p for p in model.parameters()}.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights are counted once and 4-bit
    weights by their true element count."""
    params = unique_parameters(model)
    total = sum(logical_numel(p) for p in params)
    return sum(logical_numel(p) for p in params if p.requires_grad), total


def memory_footprint(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the base model's weights as loaded, and in ``dtype`` without quantization.

    ``loaded`` sums the stored parameters and buffers (a 4-bit weight: half a byte per
    element, plus its quantization constants); ``full_precision`` is every parameter at
    ``dtype``'s width plus the same buffers. They differ only for a quantized base.
    """
    params = unique_parameters(model)
    buffers = sum(b.nbytes for b in model.buffers())
    loaded = sum(p.nbytes for p in params) + buffers + _quant_constants(params)
    full = sum(logical_numel(p) for p in params) * dtype.itemsize + buffers
    return {"loaded": loaded, "full_precision": full}


def _quant_constants(params: list[nn.Parameter]) -> int:
    """Bytes of bitsandbytes' per-block scales (and, with double quantization, theirs)."""
    total = 0
    for p in params:
        state = getattr(p, "quant_state", None)
        while state is not None:
            total += state.absmax.nbytes
            state = getattr(state, "state2", None)
    return total


@torch.no_grad()
def smoke_forward(model: nn.Module) -> None:
    """One forward of 4 tokens in eval mode; raises whatever the model raises."""
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    with evaluating(model):
        model(input_ids=torch.arange(4, device=device).unsqueeze(0) % vocab, use_cache=False)
