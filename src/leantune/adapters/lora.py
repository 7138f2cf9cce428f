"""LoRA (and DoRA, rsLoRA) through HF PEFT, and QLoRA: the same LoRA on a base stored in
4-bit NF4 by bitsandbytes.

LoRA: ``W x + s B A x`` with A [r, in], B [out, r] (B starts at zero, so training starts
from the base model) and ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). DoRA adds a
trained magnitude per output channel: ``m * (W + s B A) / ||W + s B A||_col``.

QLoRA (Dettmers et al. 2023): the frozen base weights are NF4 with double quantization
(the per-block scales are quantized too); matmuls dequantize block by block to the
compute dtype, and only the LoRA matrices (full precision) train.
"""

from __future__ import annotations

import copy
import logging

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from torch import nn

from leantune.adapters.lora_kernel import fuse_lora_layers
from leantune.adapters.peft_adapter import PeftAdapter
from leantune.adapters.targets import all_linear_targets, preset_targets
from leantune.model.dropout import use_fast_dropout

log = logging.getLogger(__name__)


def lora_targets(model: nn.Module, spec: list[str] | str) -> list[str]:
    """PEFT ``target_modules`` for ``adapter.target_modules`` (auto = all-linear: every
    linear layer but the output head and mixture-of-experts routers; PEFT's own
    ``all-linear`` would wrap the routers too). A preset leaves out what PEFT refuses to
    wrap on this model (:func:`peft_refuses`), saying so once."""
    if isinstance(spec, list):
        return spec
    found = all_linear_targets(model) if spec in ("auto", "all-linear") else preset_targets(
        model, spec)
    refused = [t for t in found if peft_refuses(model, t)]
    if refused and len(refused) < len(found):
        log.warning("adapter.target_modules=%s: PEFT does not wrap %s on %s (its kernels read "
                    "those weights directly); LoRA goes on %s", spec, ", ".join(refused),
                    model.config.model_type, ", ".join(t for t in found if t not in refused))
        return [t for t in found if t not in refused]
    return found


def peft_refuses(model: nn.Module, target: str) -> bool:
    """Whether PEFT's own rule refuses LoRA on ``target`` for this model: ``out_proj`` and
    ``conv1d`` of Mamba-based models, whose fused kernels read the weight itself and would
    skip the adapter. PEFT's check is asked, so its rule and ours cannot drift apart."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return False
    try:
        _check_lora_target_modules_mamba(LoraConfig(), model, target.rsplit(".", 1)[-1])
    except ValueError:
        return True
    return False


def fused_expert_targets(config: LoraConfig, model: nn.Module) -> set[str]:
    """The fused mixture-of-experts weights PEFT will adapt for ``config``'s targets.

    transformers 5 holds the routed experts of DeepSeek-V2/V3, GLM-4-MoE, OLMoE, Qwen3-MoE
    and their kin as 3-D tensors (``experts.gate_up_proj``, ``experts.down_proj``); so that
    adapters trained on transformers 4 still load, PEFT maps every ``gate_proj`` /
    ``up_proj`` / ``down_proj`` target of those models to these tensors (a
    ``lora.ParamWrapper``, which takes no dropout) in place of the layers of that name.
    Empty where PEFT has no such mapping (older PEFT, other models)."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:
        return set()
    probe = copy.deepcopy(config)
    convert_peft_config_for_transformers(probe, model=model,
                                         conversions=get_model_conversion_mapping(model))
    return set(probe.target_parameters or ())


def fast_lora_dropout(model: nn.Module) -> nn.Module:
    """``model`` with PEFT's LoRA dropout (``nn.Dropout`` per adapted layer) drawn by
    :class:`~leantune.model.dropout.FastDropout`: the same inverted dropout for a quarter
    of the random numbers (``bernoulli_`` was 11-17 % of a CPU step), and each plain LoRA
    linear layer run as one fused autograd node
    (:class:`~leantune.adapters.lora_kernel.LoRALinear`)."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            use_fast_dropout(module.lora_dropout)
    fuse_lora_layers(model)
    return model


class LoRA(PeftAdapter):
    name = "lora"

    def apply(self, model: nn.Module) -> nn.Module:
        return fast_lora_dropout(super().apply(model))

    def load(self, base: nn.Module, directory, trainable: bool = False) -> nn.Module:
        return fast_lora_dropout(super().load(base, directory, trainable))

    def peft_config(self, model: nn.Module) -> LoraConfig:
        """PEFT's config; LoRA dropout off where PEFT adapts fused experts (their wrapper
        refuses it), with a warning: else the model could not take LoRA at all."""
        c = self.cfg
        config = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                            target_modules=lora_targets(model, c.target_modules),
                            use_rslora=c.use_rslora, use_dora=c.use_dora, task_type="CAUSAL_LM")
        if c.dropout and (fused := fused_expert_targets(config, model)):
            log.warning("adapter.dropout=%g: PEFT adapts %s's fused mixture-of-experts weights "
                        "(%s) through a wrapper that takes no dropout; training with "
                        "lora_dropout=0", c.dropout, type(model).__name__,
                        ", ".join(sorted(fused)))
            config.lora_dropout = 0.0
        return config


class QLoRA(LoRA):
    name = "qlora"
    merge_note = (
        "QLoRA: the 4-bit base was dequantized to full precision and the adapter merged into "
        "that, so the exported model reproduces the trained 4-bit base + adapter. It is not "
        "the original full-precision base + adapter (the adapter learned to correct the "
        "4-bit weights), and merging into the 4-bit weights themselves would requantize and "
        "change outputs (peft#2321).")

    def quantization(self, compute_dtype: torch.dtype):
        try:
            import bitsandbytes  # noqa: F401  (transformers' own message is less direct)
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ImportError("adapter.method=qlora needs bitsandbytes (>= 0.46 for CPU): "
                              "pip install 'leantune[qlora]'") from None
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.cfg.quant_type,
            bnb_4bit_use_double_quant=self.cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype)

    def prepare_base(self, model: nn.Module) -> nn.Module:
        # Casts the remaining (non-4-bit) weights such as norms to fp32 for stable training
        # and makes the input embeddings' output require grad, so gradient checkpointing
        # has a path back to the adapters.
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model.is_gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})

    def merge_base(self, base: nn.Module) -> nn.Module:
        return base.dequantize()  # transformers: every Linear4bit -> nn.Linear, same values
