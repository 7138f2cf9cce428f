"""IA3 (Liu et al. 2022, "(IA)^3") through HF PEFT: learned vectors that rescale
activations, ``y = l ⊙ (W x)`` for attention keys/values and ``y = W (l ⊙ x)`` for the
feed-forward down-projection (its input is the MLP's hidden activation). Every ``l``
starts at 1, so training starts from the base model; merging multiplies ``l`` into W.
"""

from __future__ import annotations

from peft import IA3Config
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn

from leantune.adapters.peft_adapter import PeftAdapter
from leantune.adapters.targets import feedforward_targets, preset_targets


def ia3_targets(model: nn.Module, spec: list[str] | str) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` for ``adapter.target_modules``.

    auto: PEFT's per-architecture choice (keys or queries, values, MLP down-projection).
    A preset or list: those modules, with the MLP down-projections among them scaled
    on their input.

    Raises:
        ValueError: auto on an architecture PEFT has no IA3 defaults for.
    """
    if spec == "auto":
        kind = model.config.model_type
        if kind not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            raise ValueError(f"adapter.target_modules=auto: PEFT has no IA3 defaults for model "
                             f"type {kind!r}; use a preset (attention, mlp, all-linear) or a list")
        return (list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]),
                list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[kind]))
    targets = spec if isinstance(spec, list) else preset_targets(model, spec)
    return targets, feedforward_targets(model, targets)


class IA3(PeftAdapter):
    name = "ia3"

    def peft_config(self, model: nn.Module) -> IA3Config:
        targets, feedforward = ia3_targets(model, self.cfg.target_modules)
        return IA3Config(target_modules=targets, feedforward_modules=feedforward,
                         task_type="CAUSAL_LM")
