"""One optimizer step: accumulating micro-batches equals one big batch, and the reported
loss is the mean NLL over the step's target tokens (never a mean of per-batch means)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.data.encode import IGNORE, Encoded
from leantune.objectives import NEXT_TOKEN
from leantune.packing.collate import collate_padded
from leantune.train.step import train_step

from conftest import NanLoss, loss_sum

# (length, prompt tokens without a label): target counts 3, 11, 6, 12 - deliberately unequal.
SHAPES = [(6, 3), (13, 2), (9, 3), (16, 4)]


def make_examples(vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in SHAPES:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@pytest.fixture
def lora_model(llama_dir):
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    torch.manual_seed(1)
    model = build_adapter(AdapterConfig(r=4, alpha=8.0, dropout=0.0)).apply(base)
    with torch.no_grad():  # B = 0 would leave A without gradient; make both move
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def reference_loss(model, examples: list[Encoded]) -> float:
    """Summed token NLL over every example (one unpadded forward each) / target count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for t in range(len(e.input_ids) - 1):
                if e.labels[t + 1] != IGNORE:
                    total -= float(logp[t, e.labels[t + 1]])
                    count += 1
    return total / count


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_accumulation_equals_one_big_batch(lora_model, max_grad_norm):
    acc = Accelerator(cpu=True)
    pad_id = lora_model.config.pad_token_id
    examples = make_examples(lora_model.config.vocab_size)
    micro = [collate_padded(examples[:1], pad_id), collate_padded(examples[1:], pad_id)]
    big = [collate_padded(examples, pad_id)]
    assert micro[0]["input_ids"].shape[1] != big[0]["input_ids"].shape[1]  # padding differs
    targets = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
    assert targets == [3, 29]

    start = trainable(lora_model)
    expected_loss = reference_loss(lora_model, examples)
    split_model, whole_model = copy.deepcopy(lora_model), copy.deepcopy(lora_model)
    results = []
    for model, batches in ((split_model, micro), (whole_model, big)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        results.append(train_step(model, opt, batches, acc, max_grad_norm))
    split, whole = results

    assert split.count == whole.count == 32
    assert split.loss == pytest.approx(expected_loss, rel=1e-6)
    assert whole.loss == pytest.approx(expected_loss, rel=1e-6)
    if max_grad_norm is None:
        assert split.grad_norm is None and whole.grad_norm is None
    else:
        assert whole.grad_norm > max_grad_norm  # clipping is active
        assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    after_split, after_whole = trainable(split_model), trainable(whole_model)
    assert max((after_whole[n] - start[n]).abs().max() for n in start) > 1e-3  # it moved
    for name in start:
        torch.testing.assert_close(after_split[name], after_whole[name], atol=1e-6, rtol=0)
    for (name, p), q in zip(split_model.named_parameters(), lora_model.parameters()):
        if not p.requires_grad:
            assert torch.equal(p, q), name  # the frozen base never changes


def test_mean_of_batch_means_would_be_caught(lora_model):
    """The update of a mean of per-micro-batch means differs far beyond the tolerance
    used above, so that test can tell the two apart."""
    acc = Accelerator(cpu=True)
    pad_id = lora_model.config.pad_token_id
    examples = make_examples(lora_model.config.vocab_size)
    micro = [collate_padded(examples[:1], pad_id), collate_padded(examples[1:], pad_id)]
    right, wrong = copy.deepcopy(lora_model), copy.deepcopy(lora_model)
    train_step(right, torch.optim.SGD([p for p in right.parameters() if p.requires_grad], lr=1.0),
               micro, acc, None)
    opt = torch.optim.SGD([p for p in wrong.parameters() if p.requires_grad], lr=1.0)
    for b in micro:
        loss, n = loss_sum(wrong, b)
        (loss / n / len(micro)).backward()
    opt.step()
    gap = max((a - b).abs().max() for a, b in zip(trainable(right).values(),
                                                   trainable(wrong).values()))
    assert gap > 1e-4


def test_loss_sum_ignores_padding_and_masked_labels(lora_model):
    pad_id = lora_model.config.pad_token_id
    examples = make_examples(lora_model.config.vocab_size)
    with torch.no_grad():
        loss, n = loss_sum(lora_model, collate_padded(examples, pad_id))
    assert n == sum(e.num_targets for e in examples) == 32
    assert float(loss) / n == pytest.approx(reference_loss(lora_model, examples), rel=1e-6)


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_a_non_finite_step_makes_no_update(fault, lora_model, tokenizer, monkeypatch):
    """NaN loss, or a finite loss with an infinite gradient: weights and AdamW moments are
    left exactly as they were, and the step says so."""
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate_padded(make_examples(len(tokenizer)), tokenizer.pad_token_id)
    assert train_step(lora_model, opt, [batch], acc, 1.0).applied  # moments now exist
    before, moments = trainable(lora_model), copy.deepcopy(opt.state_dict())
    objective = NEXT_TOKEN
    if fault == "nan_loss":
        objective = NanLoss()
    else:
        param = next(p for p in lora_model.parameters() if p.requires_grad)
        param.register_hook(lambda g: g * float("inf"))
    result = train_step(lora_model, opt, [batch], acc, 1.0, objective)
    assert not result.applied
    assert all(torch.equal(before[n], p) for n, p in trainable(lora_model).items())
    state = opt.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], moments["state"][k]["exp_avg"]) for k in state)
    assert all(p.grad is None for p in lora_model.parameters())
