"""The fused LoRA layer against PEFT's own forward (the instance attribute removed), on the
same random masks: equal in fp32, as close to fp32 as PEFT's in bf16, and PEFT's path
wherever it is not the plain case."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from leantune.adapters.lora import fast_lora_dropout
from leantune.adapters.lora_kernel import LoRALinear, fuse_lora_layers, unfuse_lora_layers


def lora_llama(dropout=0.1, seed=0, **lora):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", **lora))
    model = fast_lora_dropout(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter a path to matter
            nn.init.normal_(p, std=0.1)
    return model


def unfused(model):
    """The same model with PEFT's own ``lora.Linear.forward``."""
    other = copy.deepcopy(model)
    assert unfuse_lora_layers(other) == 14
    return other


def loss_and_grads(model, ids, autocast=False, embeds=False, seed=5):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    kwargs = {"input_ids": ids}
    if embeds:  # a leaf input that requires grad: the gradient of x itself is checked
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        kwargs = {"inputs_embeds": x}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**kwargs, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if embeds:
        grads["inputs_embeds"] = x.grad
    return loss.detach(), grads


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_every_plain_lora_linear_is_fused():
    model = lora_llama()
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert len(layers) == 14 and all("forward" in m.__dict__ for m in layers)
    assert fuse_lora_layers(model) == 14  # again: idempotent


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_equals_peft_on_the_same_masks(dropout):
    fused = lora_llama(dropout)
    peft = unfused(fused)
    ids = torch.randint(0, 96, (2, 16))
    lf, gf = loss_and_grads(fused, ids, embeds=True)
    lp, gp = loss_and_grads(peft, ids, embeds=True)
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-6)
    assert gf.keys() == gp.keys() and len(gf) == 29
    for name in gp:
        assert rel(gf[name], gp[name]) < 1e-5, name
    if dropout:  # the masks matter: another seed gives other gradients
        _, other = loss_and_grads(fused, ids, embeds=True, seed=6)
        assert rel(other["inputs_embeds"], gp["inputs_embeds"]) > 1e-3


def test_bf16_is_as_close_to_fp32_as_peft():
    fused = lora_llama()
    peft = unfused(fused)
    ids = torch.randint(0, 96, (2, 16))
    _, exact = loss_and_grads(peft, ids)
    _, gf = loss_and_grads(fused, ids, autocast=True)
    _, gp = loss_and_grads(peft, ids, autocast=True)
    errs = [(rel(gf[n], exact[n]), rel(gp[n], exact[n])) for n in exact]
    assert all(f < 0.1 for f, _ in errs)
    mean_fused = sum(f for f, _ in errs) / len(errs)
    mean_peft = sum(p for _, p in errs) / len(errs)
    assert mean_fused < 1.25 * mean_peft
    assert all(g.dtype == torch.float32 for g in gf.values())


def test_matches_the_formula_with_a_base_bias():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, requires_grad=True)
    w, bias = torch.randn(7, 12), torch.randn(7)
    a = torch.randn(4, 12, requires_grad=True)
    b = torch.randn(7, 4, requires_grad=True)
    keep = torch.rand(3, 5, 12) > 0.2
    mask = keep.to(torch.int32).neg()  # keep_mask's form: all bits set where kept
    y = LoRALinear.apply(x, w, bias, a, b, 0.5, mask, torch.float32)
    ref = x @ w.T + bias + 0.5 * ((x * keep) @ a.T) @ b.T
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), gy)
    want = torch.autograd.grad(ref, (x, a, b), gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_peft_path_where_not_plain():
    fused = lora_llama(dropout=0.0)
    peft = unfused(fused)
    ids = torch.randint(0, 96, (2, 16))
    fused.eval(), peft.eval()
    with torch.no_grad():
        with fused.disable_adapter(), peft.disable_adapter():
            torch.testing.assert_close(fused(ids).logits, peft(ids).logits, rtol=0, atol=0)
        fused.merge_adapter()
        peft.merge_adapter()
        torch.testing.assert_close(fused(ids).logits, peft(ids).logits, rtol=0, atol=0)
    dora = lora_llama(use_dora=True)
    hooked = lora_llama()
    seen = []
    base = hooked.base_model.model.model.layers[0].mlp.down_proj.base_layer
    base.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    calls = []
    original = LoRALinear.apply
    LoRALinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        loss_and_grads(dora, ids)
        assert not calls  # DoRA's magnitude is PEFT's variant: not fused
        loss_and_grads(hooked, ids)
    finally:
        LoRALinear.apply = original
    assert seen == [(2, 16, 64)]  # the hooked layer ran PEFT's path, its hook with it
    assert len(calls) == 13  # the other 13 layers stayed fused


def test_gradient_checkpointing_replays_the_same_masks():
    plain = lora_llama()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    ids = torch.randint(0, 96, (2, 16))
    lp, gp = loss_and_grads(plain, ids)
    lc, gc = loss_and_grads(ckpt, ids)
    torch.testing.assert_close(lc, lp)
    for name in gp:
        assert rel(gc[name], gp[name]) < 1e-5, name
