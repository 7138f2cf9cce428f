"""LoRA through HF PEFT: W x + (alpha / r) * B A x, with A [r, in] and B [out, r]
(B starts at zero, so training starts from the base model). Saved in PEFT's own format:
``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn

from leantune.config import AdapterConfig


@dataclass
class LoRA:
    """LoRA adapter built from ``adapter.*`` config fields."""

    cfg: AdapterConfig
    name: str = "lora"

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules, use_rslora=self.cfg.use_rslora,
            use_dora=self.cfg.use_dora,
            task_type="CAUSAL_LM",
        )

    def apply(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, self.peft_config())

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        result = set_peft_model_state_dict(model, load_peft_weights(str(directory)))
        # missing_keys lists every base weight too; only LoRA matrices left out matter (they
        # would silently keep their fresh init).
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"{directory}: adapter weights do not fit this model "
                             f"(unexpected: {result.unexpected_keys[:3]}, missing: {missing[:3]})")
