"""One autograd node per LoRA layer: PEFT's ``lora.Linear`` forward and backward, fused.

PEFT computes ``base(x) + B(A(dropout(x))) * s`` as six modules' worth of autograd nodes
(the base linear, the dropout, A, B, the scaling, the sum) and, under bf16 autocast, casts
around each: the input once for the base and once more for the adapter, every LoRA weight
and every gradient back to fp32, and the gradient of ``x`` summed in fp32 from the two
branches. On a CPU step of the quickstart that overhead (copies, masks, elementwise ops)
cost more than the LoRA matmuls themselves. :class:`LoRALinear` does the same arithmetic
with the compute dtype fixed once (the autocast dtype, else the input's)::

    xc  = x.to(c)                           [N, in]
    xd  = xc & mask                         (FastDropout's mask on the bits; none at p = 0)
    h   = xd @ A^T                          [N, r]
    y   = xc @ W^T + b + s' h @ B^T         [N, out]   (one addmm; s' = s / (1 - p'))

    dh  = s' dy @ B                         [N, r]
    dB  = s' dy^T @ h,   dA = dh^T @ xd     (cast to the fp32 master weights' dtype)
    dx  = dy @ W + (dh @ A) & mask          (one addmm), cast to x's dtype

Saved for backward: ``xd``, ``h``, the mask and the weights (references; A and B in the
compute dtype, r rows each). The base is frozen, so W's gradient and with it ``xc`` are
never needed: less kept than PEFT's graph, which holds ``xc`` for the base linear and the
dropout's input and output.

The masks are :func:`~leantune.model.dropout.keep_mask`'s, drawn from the same generator
in the same order as PEFT's forward with :class:`~leantune.model.dropout.FastDropout`, so
the fused and unfused layers drop the same elements (tested). Only the plain case is
fused: one active adapter, not merged, adapters enabled, no DoRA or other variant, an
``nn.Linear`` base, no forward hook on the base or adapter modules, no per-call adapter
names, not inside ``torch.compile`` (which fuses the unfused graph itself); every other
call runs PEFT's own forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from leantune.model.dropout import FastDropout, keep_mask, masked


class LoRALinear(torch.autograd.Function):
    """``y = x W^T + b + s' (x & mask) A^T B^T`` in compute dtype ``dtype``; see the module
    docstring for the formulas. ``mask`` (:func:`~leantune.model.dropout.keep_mask`'s) is
    None when nothing is dropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, mask, dtype):
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):  # every operand is in dtype
            xc = x.to(dtype)
            xd = xc if mask is None else masked(xc, mask)
            a, b, w = lora_a.to(dtype), lora_b.to(dtype), weight.to(dtype)
            xd = xd.reshape(-1, shape[-1])
            h = xd @ a.t()
            # matmul folds the leading dimensions into one mm and returns a tensor of its
            # own (a view here could not be modified in place by the model's code).
            y = torch.matmul(xc, w.t())
            flat = y.view(-1, y.shape[-1])
            flat.addmm_(h, b.t(), alpha=scale)
            if bias is not None:
                flat.add_(bias.to(dtype))
        ctx.save_for_backward(xd, h, mask, weight, a, b)
        ctx.scale, ctx.dtype, ctx.shape = scale, dtype, shape
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, h, mask, weight, a, b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scale
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
            dh = (dy @ b).mul_(s)
            grad_a = (dh.t() @ xd).to(a_dtype) if ctx.needs_input_grad[3] else None
            grad_b = (dy.t() @ h).mul_(s).to(b_dtype) if ctx.needs_input_grad[4] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                lora_dx = dh @ a
                if mask is not None:
                    lora_dx = masked(lora_dx, mask.reshape(lora_dx.shape))
                grad_x = lora_dx.addmm_(dy, weight.to(dtype)).to(x_dtype).reshape(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _plain(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``layer``'s call is the plain LoRA case :class:`LoRALinear` computes."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    active = layer.active_adapters
    if (len(active) != 1 or active[0] not in layer.lora_A
            or active[0] in getattr(layer, "lora_variant", ())
            or layer.use_dora.get(active[0]) or layer.lora_B[active[0]].bias is not None):
        return False
    if torch.compiler.is_compiling() or not x.is_floating_point():
        return False
    base = layer.base_layer
    dropout = layer.lora_dropout[active[0]]
    parts = (base, layer.lora_A[active[0]], layer.lora_B[active[0]], dropout)
    return (type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and isinstance(dropout, (FastDropout, nn.Identity))
            and not any(_hooked(m) for m in parts))


def _hooked(module: nn.Module) -> bool:
    """Whether a hook would run around ``module``'s forward: the fused node never calls
    those forwards, so a hooked layer (an intervention, a user's probe) keeps PEFT's path."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` through :class:`LoRALinear` in the plain case; PEFT's
    own forward otherwise."""
    if not _plain(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    device = x.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else x.dtype)
    scale, mask = self.scaling[name], None
    dropout = self.lora_dropout[name]
    if isinstance(dropout, FastDropout) and dropout.training and dropout.p > 0:
        mask, p = keep_mask(x.shape, dropout.p, x.device, dtype)
        scale = scale / (1 - p)
    base = self.base_layer
    return LoRALinear.apply(x, base.weight, base.bias, a, b, scale, mask, dtype)


def fuse_lora_layers(model: nn.Module) -> int:
    """Route every PEFT ``lora.Linear`` under ``model`` through :func:`fused_forward` (an
    instance attribute: the class, its merge and save are untouched); the count."""
    from peft.tuners.lora.layer import Linear

    fused = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
    return fused


def unfuse_lora_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_lora_layers`: PEFT's own ``lora.Linear.forward`` again for every
    layer under ``model`` (other instance forwards, such as the model's autocast wrapper,
    stay); the count."""
    from peft.tuners.lora.layer import Linear

    return sum(module.__dict__.pop("forward", None) is not None
               for module in model.modules() if type(module) is Linear)
