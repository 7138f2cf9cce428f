"""The part every HF-PEFT method shares: wrap with ``get_peft_model``, save in PEFT's own
format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained``, vLLM and TGI), reload, and restore checkpoint weights
with a check that every trained tensor was found.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from leantune.adapters.base import Adapter


class PeftAdapter(Adapter):
    """A method that HF PEFT implements; subclasses say which config it takes."""

    def peft_config(self, model: nn.Module) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, self.peft_config(model))

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        """Restore saved adapter weights into ``model`` in place.

        Raises:
            ValueError: the saved tensors are not exactly this adapter's (a missing one
                would silently keep its fresh init).
        """
        saved = load_peft_weights(str(directory))
        expected = set(get_peft_model_state_dict(model))
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(f"{directory}: adapter weights do not fit this model "
                             f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
        set_peft_model_state_dict(model, saved)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
