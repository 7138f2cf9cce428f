import math

import pytest
import torch
from torch import nn

from leantune.model.dropout import LEVELS, FastDropout, keep_mask, masked, use_fast_dropout


def test_mask_drops_the_rounded_probability_and_lanes_are_independent():
    torch.manual_seed(0)
    n = 1 << 22
    mask, p = keep_mask(torch.Size([n]), 0.05, torch.device("cpu"))
    assert mask.dtype == torch.int16 and set(mask.unique().tolist()) == {-1, 0}
    keep = mask != 0
    assert p == round(0.05 * LEVELS) / LEVELS and abs(p - 0.05) <= 2**-17
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs((1 - keep.float().mean().item()) - p) < 5 * sigma
    # Four lanes come from one 64-bit draw: neighbours must still be independent.
    pairs = keep[0::2] & keep[1::2]
    q = (1 - p) ** 2
    assert abs(pairs.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / (n // 2))


def test_dropout_is_inverted_and_its_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(512, 384, requires_grad=True)
    drop = FastDropout(0.3).train()
    y = drop(x)
    kept = y != 0
    scale = 1 / (1 - round(0.3 * LEVELS) / LEVELS)
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * scale)
    x.grad = None
    drop(x).sum().backward()  # an expanded (stride 0) gradient comes back masked as well
    assert 0.65 < (x.grad != 0).float().mean().item() < 0.75
    torch.testing.assert_close(x.grad.unique(), torch.tensor([0.0, scale]))
    # E[y] = x: over many masks the mean output of a fixed input is the input.
    ones = torch.ones(1 << 20)
    assert abs(drop(ones).mean().item() - 1) < 5 * math.sqrt(0.3 / 0.7 / (1 << 20))


def test_identity_in_eval_and_at_zero_and_seeded():
    x = torch.randn(64, 32)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    a = FastDropout(0.5).train()(x)
    torch.manual_seed(3)
    b = FastDropout(0.5).train()(x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FastDropout(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_bitwise_mask_is_a_select(dtype):
    torch.manual_seed(2)
    x = torch.randn(300, 77).to(dtype)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30, -3.0])
    mask, p = keep_mask(x.shape, 0.4, x.device, dtype)
    assert mask.dtype.itemsize == dtype.itemsize and abs(p - 0.4) <= 2**-17
    got = masked(x, mask)
    want = torch.where(mask != 0, x, torch.zeros((), dtype=dtype))
    assert got.dtype == dtype and torch.equal(got.view(mask.dtype), want.view(mask.dtype))
    strided = x.t()  # any layout: the AND reads the values' bits where they are
    torch.testing.assert_close(masked(strided, mask.t()), want.t(), rtol=0, atol=0,
                               equal_nan=True)
    # p rounding to no drop at all, and the largest p the lanes can express
    assert bool((keep_mask(x.shape, 1e-7, x.device, dtype)[0] == -1).all())
    assert keep_mask(x.shape, 0.99999999, x.device, dtype)[1] == (LEVELS - 1) / LEVELS


def test_autocast_output_is_the_autocast_dtype():
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FastDropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    torch.testing.assert_close(y[kept].float(), (x[kept] / (1 - round(0.1 * LEVELS) / LEVELS)),
                               rtol=1e-2, atol=1e-2)


def test_replaces_dropout_keeping_mode_and_leaves_p_zero():
    block = nn.ModuleDict({"a": nn.Dropout(0.1), "b": nn.Dropout(0.0), "c": nn.Identity()})
    block.eval()
    assert use_fast_dropout(block) == 1
    assert isinstance(block["a"], FastDropout) and not block["a"].training
    assert block["a"].p == 0.1 and type(block["b"]) is nn.Dropout
