"""The chunked head + log-softmax: the same log-probabilities, losses and gradients as the
plain head's logits through ``F.cross_entropy`` (and an fp64 reference), in chunks
smaller than the targets, for every adapter method and architecture; close under bf16
autocast. Its start-up check is in test_loss_paths.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leantune.model.chunked_loss as chunked_loss
from leantune.model.chunked_loss import chunked_head, linear_log_probs
from leantune.model.logprobs import count_targets, target_logprobs

from helpers import ARCHS, METHODS, build, packed_batch


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 3 rows, so every test crosses chunk boundaries."""
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 3 * 101)


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("bias", [False, True])
def test_equals_plain_and_fp64(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 101, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 101, (23,))
    params = (hidden, head.weight, *([head.bias] if bias else []))
    ours = -linear_log_probs(hidden, head, targets).sum()
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    exact = F.cross_entropy(F.linear(hidden.double(), head.weight.double(),
                                     head.bias.double() if bias else None), targets,
                            reduction="sum")
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)
    assert abs(float(ours) - float(exact)) <= 1e-6 * float(exact)
    for g, ref in zip(grads_of(2.5 * ours, *params), grads_of(2.5 * plain, *params)):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_per_token_log_probs_and_their_gradients_equal_plain():
    """Each target's log-probability, and gradients weighted differently per target (what
    a sequence-level loss sends back), match the plain log-softmax."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 101)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 101, (23,))
    weights = torch.randn(23)
    ours = linear_log_probs(hidden, head, targets)
    plain = head(hidden).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    assert ours.shape == (23,)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    params = (hidden, head.weight, head.bias)
    for g, ref in zip(grads_of((weights * ours).sum(), *params),
                      grads_of((weights * plain).sum(), *params)):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_close_under_bf16_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 101, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 101, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = -linear_log_probs(hidden, head, targets).sum()
        plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-3)
    got = grads_of(ours, hidden, head.weight)
    ref = grads_of(plain, hidden, head.weight)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert float((g - r).norm() / r.norm()) < 1e-2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_model_loss_and_gradients_equal_plain(arch_dirs, arch, method):
    model, adapter = build(arch_dirs[arch], method)
    model.eval()  # no dropout: the two forwards must see the same function
    batch = packed_batch(model.config.vocab_size)
    assert chunked_head(model) is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = -target_logprobs(model, batch, chunked=True).sum()
    plain = -target_logprobs(model, batch, chunked=False).sum()
    assert count_targets(batch) > 0
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads_of(loss, *trainable), grads_of(plain, *trainable)):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
