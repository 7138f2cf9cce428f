"""The LM head at the target positions only: the loss and every trainable gradient equal
those of the full head (every position's logits, as transformers computes them), for
every adapter method and architecture family, and the logits are only the N targets'."""

from __future__ import annotations

import pytest
import torch

from leantune.data.encode import IGNORE
from leantune.model.head import head_at, output_head
from leantune.model.logprobs import count_targets, full_nll, model_inputs, target_logprobs

from helpers import ARCHS, METHODS, build, packed_batch


def loss_and_grads(model, batch, full: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (GPT-2 drops out in training)
    loss = full_nll(model, batch)[1] if full else -target_logprobs(model, batch).sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def logits_of(model, batch, select):
    torch.manual_seed(0)
    with torch.no_grad(), head_at(model, select):
        return model(**model_inputs(batch, model)).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_target_head_equals_full_head(arch_dirs, arch, method):
    model, adapter = build(arch_dirs[arch], method)
    model.train()
    batch = packed_batch(model.config.vocab_size)
    ref_loss, ref_grads = loss_and_grads(model, batch, full=True)
    loss, grads = loss_and_grads(model, batch, full=False)
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    targets = int((labels != IGNORE).sum())
    ref_logits = logits_of(model, batch, None)[:, -labels.shape[1]:]
    logits = logits_of(model, batch, labels != IGNORE)
    assert ref_logits.dim() == 3 and logits.shape == (targets, model.config.vocab_size)
    assert count_targets(batch) == targets < labels.numel() // 2
    torch.testing.assert_close(logits, ref_logits[labels != IGNORE], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_hook_is_removed_and_missing_head_falls_back(arch_dirs):
    model, _ = build(arch_dirs["llama"], "lora")
    head = output_head(model)
    assert head is model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7, 8]])
    select = torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        with head_at(model, select):
            assert model(input_ids=ids).logits.shape == (2, model.config.vocab_size)
        assert model(input_ids=ids).logits.shape == (1, 4, model.config.vocab_size)
        assert not head._forward_pre_hooks

    class Headless(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with head_at(Headless(), select):  # nothing to hook: the module runs as it is
        assert Headless()(torch.ones(2)).tolist() == [2.0, 2.0]
