"""A FLOPs ledger that counts frozen and trainable weights honestly.

For a batch of ``R`` rows of ``T`` positions (pads included: their compute is spent),
with ``P_f`` frozen and ``P_t`` trainable matmul weights (every ``nn.Linear`` or GPT-2
style ``Conv1D``, the LM head and adapter matrices included; embedding lookups are not
matmuls), ``L`` layers and attention width ``d``:

- forward:  ``2 (P_f + P_t) R T + 2 L d R T^2``   (causal QK^T and AV)
- backward: ``2 (P_f + P_t) R T`` for activation gradients through every layer,
  ``+ 2 P_t R T`` for weight gradients (trainable weights only),
  ``+ 4 L d R T^2`` for attention.

Attention is counted over the whole row of ``T`` positions, as the dense masked kernels
of CPU eager/sdpa compute it; for a packed row a varlen kernel (flash-attention) does only
the sum of the examples' squares, so there this term is an upper bound.

The LM head (``P_h`` of those weights, ``h_tr`` of them trainable) runs only at the
``N`` positions that predict a target (:mod:`leantune.model.head`; a choice's score: its
continuation), so its ``2 P_h R T`` forward becomes ``2 P_h N``, and likewise in the
backward: ``2 P_h N`` for the activation gradient, ``+ 2 h_tr N`` for its weight's.
Without ``N`` (``heads=None``) the head runs at every position.

Full fine-tuning thus costs the usual ~3x a forward; a frozen base with a small adapter
costs ~2x, because the frozen weights' gradients are never formed. A 4-bit weight counts
by its true element count (its matmul runs in the compute dtype after dequantizing).
Prompt tuning's ``n`` virtual tokens make every row ``T + n`` positions long.
Not counted: element-wise work (norms, activations, IA3's scales), DoRA's per-step
weight norms, and ReFT's edits (about ``6 r d`` per edited position plus a ``d x d``
Cayley solve and product per LoReFT intervention per forward: ~10 % of a forward of 8 x 128 tokens
on the embedded default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from leantune.data.encode import Encoded
from leantune.data.preference import EncodedPreference
from leantune.model.head import output_head
from leantune.model.load import config_size, text_config


def logical_numel(p: torch.Tensor) -> int:
    """Elements of a parameter as the model sees it: a 4-bit weight packs two per byte
    (bitsandbytes keeps the true shape in ``quant_state``)."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


@dataclass(frozen=True)
class FlopModel:
    frozen_matmul_params: int
    trainable_matmul_params: int
    layers: int
    attn_width: int
    virtual_tokens: int = 0
    head_params: int = 0             # the LM head's weights (part of the counts above)
    head_trainable: bool = False

    @classmethod
    def of(cls, model: nn.Module, virtual_tokens: int = 0) -> FlopModel:
        frozen = trainable = 0
        for module in model.modules():
            if isinstance(module, (nn.Linear, Conv1D)):  # Conv1D: GPT-2's linear layer
                n = logical_numel(module.weight)
                if module.weight.requires_grad:
                    trainable += n
                else:
                    frozen += n
        head = output_head(model)
        weight = getattr(head, "weight", None)
        # A composite model's text tower; sizes a config does not name count as 0 (the
        # attention term is then left out rather than the run stopped).
        config = text_config(model.config)
        layers = config_size(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        width = config_size(config, "hidden_size", "d_model", "n_embd", "dim", "embed_dim")
        return cls(frozen, trainable, layers or 0, width or 0,
                   virtual_tokens, logical_numel(weight) if weight is not None else 0,
                   bool(weight is not None and weight.requires_grad))

    def _head_saved(self, positions: int, heads: int | None) -> int:
        """Head weights x positions the head skips (``heads`` None: it skips none)."""
        return 0 if heads is None else self.head_params * max(positions - heads, 0)

    def forward(self, rows: int, length: int, heads: int | None = None) -> int:
        """Forward FLOPs of ``rows`` x ``length`` positions, the head at ``heads`` of them."""
        length += self.virtual_tokens
        params = self.frozen_matmul_params + self.trainable_matmul_params
        weights = 2 * (params * rows * length - self._head_saved(rows * length, heads))
        return weights + 2 * self.layers * self.attn_width * rows * length**2

    def forward_each(self, lengths: Iterable[int], heads: Iterable[int] | None = None) -> int:
        """Forward FLOPs of sequences of these lengths, one at a time (an eval set), the
        head at ``heads[i]`` positions of sequence ``i`` (None: all of them)."""
        lengths = list(lengths)
        heads = [None] * len(lengths) if heads is None else list(heads)
        return sum(self.forward(1, n, h) for n, h in zip(lengths, heads, strict=True))

    def forward_examples(self, examples: Sequence[Encoded] | Sequence[EncodedPreference]
                         ) -> int:
        """:meth:`forward_each` of encoded examples, the head at each one's targets (a
        preference pair counted as its completions, each in a row of its own)."""
        examples = [e for x in examples for e in (
            x.examples() if isinstance(x, EncodedPreference) else [x])]
        return self.forward_each([len(e.input_ids) for e in examples],
                                 [e.num_targets for e in examples])

    def train(self, rows: int, length: int, heads: int | None = None) -> int:
        """Forward + backward FLOPs of one micro-batch, the head at ``heads`` positions."""
        params = self.frozen_matmul_params + self.trainable_matmul_params
        n = length + self.virtual_tokens
        saved = self._head_saved(rows * n, heads)
        backward = 2 * (params * rows * n - saved)
        backward += 2 * (self.trainable_matmul_params * rows * n
                         - (saved if self.head_trainable else 0))
        backward += 4 * self.layers * self.attn_width * rows * n**2
        return self.forward(rows, length, heads) + backward
