"""Adapter methods behind one protocol (:class:`~leantune.adapters.base.Adapter`)."""

from __future__ import annotations

from leantune.adapters.base import Adapter, count_parameters
from leantune.adapters.lora import LoRA
from leantune.config import AdapterConfig

METHODS = {"lora": LoRA}


def build_adapter(cfg: AdapterConfig) -> Adapter:
    """The adapter named by ``cfg.method``."""
    return METHODS[cfg.method](cfg)


__all__ = ["Adapter", "METHODS", "build_adapter", "count_parameters"]
