"""The FLOPs ledger: matmul weights counted from the architecture, frozen vs trainable,
and the forward/backward formula (full fine-tuning = 3x forward, a frozen base less)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.model.flops import FlopModel

R = 4


def matmul_shapes(config) -> tuple[list[tuple[int, int]], int]:
    """``(in, out)`` of every per-layer projection, from the config alone; and the head size."""
    d, heads = config.hidden_size, config.num_attention_heads
    if config.model_type == "gpt2":
        ff = config.n_inner or 4 * d
        layer = [(d, 3 * d), (d, d), (d, ff), (ff, d)]  # c_attn, attn c_proj, c_fc, mlp c_proj
    else:
        kv = config.num_key_value_heads * d // heads
        ff = config.intermediate_size
        # q, k, v, o, gate, up, down
        layer = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]
    return layer, config.vocab_size * d


def lora_model(model_dir: str):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return build_adapter(AdapterConfig(r=R, dropout=0.0)).apply(base)


def test_counts_frozen_and_trainable_matmul_weights(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    config = model.config
    layer, head = matmul_shapes(config)
    layers = config.num_hidden_layers
    frozen = layers * sum(i * o for i, o in layer) + head  # the LM head is a matmul, frozen
    trainable = layers * sum(R * i + o * R for i, o in layer)  # A [r, in], B [out, r]
    fm = FlopModel.of(model)
    assert (fm.frozen_matmul_params, fm.trainable_matmul_params) == (frozen, trainable)
    assert (fm.layers, fm.attn_width) == (layers, config.hidden_size)
    # The trainable matmul weights are exactly the LoRA parameters.
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_full_finetuning_costs_three_forwards(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fm = FlopModel.of(model)  # every parameter trainable
    assert fm.frozen_matmul_params == 0
    P, L, d = fm.trainable_matmul_params, fm.layers, fm.attn_width
    for rows, length in [(1, 1), (3, 17), (8, 256)]:
        forward = 2 * P * rows * length + 2 * L * d * rows * length**2
        assert fm.forward(rows, length) == forward
        assert fm.train(rows, length) == 3 * forward


def test_frozen_base_skips_weight_gradients(tiny_model_dir):
    fm = FlopModel.of(lora_model(tiny_model_dir))
    Pf, Pt, L, d = fm.frozen_matmul_params, fm.trainable_matmul_params, fm.layers, fm.attn_width
    rows, length = 8, 64
    forward = fm.forward(rows, length)
    assert forward == 2 * (Pf + Pt) * rows * length + 2 * L * d * rows * length**2
    # Backward: activation grads through every weight, weight grads for trainable only.
    assert fm.train(rows, length) == 3 * forward - 2 * Pf * rows * length
    assert 2 * forward < fm.train(rows, length) < 3 * forward


def test_flops_scale_with_rows_and_quadratically_with_attention():
    fm = FlopModel(frozen_matmul_params=100, trainable_matmul_params=10, layers=2, attn_width=8)
    assert fm.forward(2, 5) == 2 * fm.forward(1, 5)
    assert fm.forward(1, 10) == 2 * 110 * 10 + 2 * 2 * 8 * 100
    assert fm.train(1, 10) == fm.forward(1, 10) + (2 * 110 + 2 * 10) * 10 + 4 * 2 * 8 * 100


def test_wrapping_adds_only_the_adapter(tiny_model_dir):
    """PEFT moves base weights into sub-modules; they stay counted, now as frozen."""
    base = FlopModel.of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    wrapped = FlopModel.of(lora_model(tiny_model_dir))
    assert wrapped.frozen_matmul_params == base.trainable_matmul_params  # base: all trainable


def test_head_counted_only_where_it_runs(tiny_model_dir):
    """The head runs at the N target positions only: each pass it appears in (forward,
    activation gradient, and its weight gradient when it trains) saves 2 P_h (R T - N)."""
    _, head = matmul_shapes(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    rows, length, n = 4, 32, 20
    skipped = rows * length - n
    lora = FlopModel.of(lora_model(tiny_model_dir))
    assert lora.head_params == head and not lora.head_trainable
    assert lora.forward(rows, length, n) == lora.forward(rows, length) - 2 * head * skipped
    assert lora.train(rows, length, n) == lora.train(rows, length) - 4 * head * skipped
    full = FlopModel.of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert full.head_trainable
    assert full.train(rows, length, n) == full.train(rows, length) - 6 * head * skipped
    assert full.train(rows, length, rows * length) == full.train(rows, length)
    assert full.forward_each([5, 7], [2, 3]) == full.forward(1, 5, 2) + full.forward(1, 7, 3)
