"""Adapter methods behind one interface (:class:`~leantune.adapters.base.Adapter`):
LoRA/DoRA, QLoRA, IA3 and prompt tuning through HF PEFT, full fine-tuning, and
LoReFT/DiReFT (ours, on forward hooks)."""

from __future__ import annotations

from leantune.adapters.base import Adapter, NotMergeable, count_parameters, memory_footprint
from leantune.adapters.full import Full
from leantune.adapters.ia3 import IA3
from leantune.adapters.lora import LoRA, QLoRA
from leantune.adapters.prompt_tuning import PromptTuning
from leantune.adapters.reft import Reft
from leantune.config import AdapterConfig, ModelConfig
from leantune.model.load import load_model, resolve_dtype

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRA, "qlora": QLoRA, "ia3": IA3, "prompt_tuning": PromptTuning, "full": Full,
    "loreft": Reft, "direft": Reft}


def build_adapter(cfg: AdapterConfig) -> Adapter:
    """The adapter named by ``cfg.method``."""
    return METHODS[cfg.method](cfg)


def load_base(model_cfg: ModelConfig, adapter: Adapter, source: str | None = None,
              device=None):
    """The base model loaded as ``adapter`` needs it (QLoRA: quantized to 4 bits)."""
    return load_model(model_cfg, source, adapter.quantization(resolve_dtype(model_cfg.dtype)),
                      device)


__all__ = ["Adapter", "METHODS", "NotMergeable", "build_adapter", "count_parameters",
           "load_base", "memory_footprint"]
