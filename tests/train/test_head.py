"""The LM head at the target positions only: the loss and every trainable gradient equal
those of the full head (every position's logits, as transformers computes them), for
every adapter method and architecture family, and the logits are only the N targets'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny_model
from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.data.collate import collate_rows
from leantune.data.encode import IGNORE, Encoded
from leantune.train.head import head_at, output_head
from leantune.train.step import forward_loss

ARCHS = ["llama", "gpt2", "gemma"]
METHODS = ["lora", "dora", "ia3", "prompt_tuning", "loreft", "full"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {a: save_tiny_model(tmp_path_factory.mktemp(a), a) for a in ARCHS}


def build(directory: str, method: str):
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch.manual_seed(3)
    cfg = AdapterConfig(method="lora" if method == "dora" else method,
                        use_dora=method == "dora", r=4, alpha=8.0, dropout=0.0,
                        num_virtual_tokens=3, layers="all", positions="f2+l2")
    adapter = build_adapter(cfg)
    model = adapter.apply(base)
    with torch.no_grad():  # LoRA's B = 0 would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model, adapter


def packed_batch(vocab: int, adapter) -> dict[str, torch.Tensor]:
    """Two rows of packed examples with prompts masked: few positions predict a target."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for shapes in ([(9, 6), (7, 5)], [(12, 10)]):
        row = []
        for n, prompt in shapes:
            ids = torch.randint(5, vocab, (n,), generator=g).tolist()
            row.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
        rows.append(row)
    return collate_rows(rows, 0, intervene=adapter.positions)


def loss_and_grads(model, batch, full: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (GPT-2 drops out in training)
    logits, loss, n = forward_loss(model, batch, full_logits=full)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return logits, loss.detach(), n, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_target_head_equals_full_head(arch_dirs, arch, method):
    model, adapter = build(arch_dirs[arch], method)
    model.train()
    batch = packed_batch(model.config.vocab_size, adapter)
    ref_logits, ref_loss, n_ref, ref_grads = loss_and_grads(model, batch, full=True)
    logits, loss, n, grads = loss_and_grads(model, batch, full=False)
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    targets = int((labels != IGNORE).sum())
    assert ref_logits.dim() == 3 and logits.shape == (targets, model.config.vocab_size)
    assert n == n_ref == targets < labels.numel() // 2
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
