"""The protocol every adapter method implements, so the loop, checkpoints, generation
and export never branch on the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn


class Adapter(Protocol):
    """One adapter method (LoRA, ...): how it wraps a model and how its weights persist.

    ``apply`` leaves exactly the adapter's parameters trainable; ``save`` writes weights
    and config together to ``directory`` (so they round-trip); ``load`` rebuilds the
    adapted model on a fresh base from such a directory; ``load_weights`` restores the
    weights into an already adapted model (checkpoint resume).
    """

    name: str

    def apply(self, model: nn.Module) -> nn.Module: ...

    def save(self, model: nn.Module, directory: Path) -> None: ...

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module: ...

    def load_weights(self, model: nn.Module, directory: Path) -> None: ...


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
