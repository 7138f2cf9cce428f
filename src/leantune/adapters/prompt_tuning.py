"""Prompt tuning (Lester et al. 2021) through HF PEFT: ``n`` trained embeddings [n, d]
prepended to every input's token embeddings; the base model is untouched, so one base
serves many tasks.

The model then sees ``n + T`` positions for ``T`` tokens: its logits are [B, n + T, V]
and the first ``n`` predict nothing (the loss takes the last T). PEFT prepends the
prompt once per row and drops ``position_ids``, so packed rows (several examples each)
would share one prompt and attend across examples: training with this method uses
padded batches (``packs = False``). Generation prepends the prompt too.
"""

from __future__ import annotations

from peft import PromptTuningConfig, PromptTuningInit
from torch import nn

from leantune.adapters.base import NotMergeable
from leantune.adapters.peft_adapter import PeftAdapter

INIT = {"random": PromptTuningInit.RANDOM, "text": PromptTuningInit.TEXT,
        "vocab": PromptTuningInit.SAMPLE_VOCAB}


class PromptTuning(PeftAdapter):
    name = "prompt_tuning"
    packs = False

    @property
    def virtual_tokens(self) -> int:
        return self.cfg.num_virtual_tokens

    def peft_config(self, model: nn.Module) -> PromptTuningConfig:
        c = self.cfg
        text = c.prompt_init == "text"
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
            prompt_tuning_init=INIT[c.prompt_init],
            prompt_tuning_init_text=c.prompt_init_text if text else None,
            # The text is tokenized with the base model's own tokenizer (a local path).
            tokenizer_name_or_path=model.name_or_path if text else None)

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeable(
            "adapter.method=prompt_tuning cannot be merged: its virtual-token embeddings are "
            "inputs prepended to every prompt, not a change to any weight. Use the run's "
            "adapter/ with PEFT (PeftModel.from_pretrained) or `leantune generate RUN_DIR`.")
