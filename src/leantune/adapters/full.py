"""Full fine-tuning: every weight trains. The honest baseline for the PEFT methods; the
run directory gets ``model/`` (a complete HF model: config + safetensors) instead of
``adapter/``, and checkpoints hold the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from leantune.adapters.base import Adapter


class Full(Adapter):
    name = "full"
    output_name = "model"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        # Training turns the KV cache off; a saved model is for generation, which wants it.
        use_cache, model.config.use_cache = model.config.use_cache, True
        try:
            model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        finally:
            model.config.use_cache = use_cache

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        self.load_weights(base, directory)
        for p in base.parameters():
            p.requires_grad_(trainable)
        return base

    @torch.no_grad()
    def load_weights(self, model: nn.Module, directory: Path) -> None:
        """Copy the saved weights (one or several safetensors shards) into ``model``.

        Raises:
            ValueError: a weight is missing (other than one tied to a loaded weight, which
                ``save_pretrained`` stores once) or the files hold unknown tensors.
        """
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors weights")
        saved = {}
        for f in files:
            saved.update(load_file(f))
        result = model.load_state_dict(saved, strict=False)
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in saved if k in own}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
        if missing or result.unexpected_keys:
            raise ValueError(f"{directory}: weights do not fit this model (missing: "
                             f"{missing[:3]}, unexpected: {result.unexpected_keys[:3]})")

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # nothing to fold: the weights are the model
