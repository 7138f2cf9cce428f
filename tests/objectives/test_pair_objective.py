"""DPO and its kin as training objectives: the reference is the model with its adapter
switched off (equal to the base loaded on its own), DPO starts at exactly log 2, pairs
give the same log-probs packed as padded, and a few steps teach the preference."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.data.preference import PreferenceStats, encode_preference, to_preference
from leantune.data.rows import Row
from leantune.model.logprobs import sequence_logprobs
from leantune.objectives.preference import PairObjective
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_packed, collate_padded
from leantune.train.step import train_step

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("dpo"), "llama")
    return path, AutoTokenizer.from_pretrained(path)


def pair_examples(tokenizer, n: int = 6) -> list:
    """``n`` pairs: the right sum chosen, a wrong one rejected."""
    out = []
    for i in range(n):
        a, b = i % 5, (3 * i) % 5
        row = Row("pairs.jsonl", f"line {i + 1}", {
            "prompt": f"add {a} {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 3}"})
        out += encode_preference(to_preference(row, "pairs"), tokenizer, 64,
                                 PreferenceStats()).examples()
    return out


def lora(path: str, method: str = "lora", perturb: bool = False):
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(method="lora" if method == "dora" else method,
                                          use_dora=method == "dora", r=4, alpha=8.0,
                                          dropout=0.0, positions="f2+l2", layers="all",
                                          num_virtual_tokens=3))
    model = adapter.apply(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
    return adapter, model


def test_dpo_starts_at_log_2_with_the_adapter_switched_off_as_reference(tiny):
    path, tokenizer = tiny
    adapter, model = lora(path)  # LoRA's B = 0: the policy is the base
    batch = collate_padded(pair_examples(tokenizer), tokenizer.pad_token_id)
    dpo = PairObjective("dpo", reference=adapter.disabled)
    with torch.no_grad():
        mean = dpo.loss_sum(model, batch) / dpo.count(batch)
    assert dpo.count(batch) == 6 and float(mean) == pytest.approx(math.log(2), abs=1e-7)
    figures = dpo.take_metrics()
    assert figures["rewards/margins"] == 0 and figures["rewards/accuracies"] == 0


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "loreft",
                                    "direft"])
def test_the_switched_off_adapter_is_the_base_loaded_on_its_own(tiny, method):
    path, tokenizer = tiny
    adapter, model = lora(path, method, perturb=True)
    batch = collate_padded(pair_examples(tokenizer), tokenizer.pad_token_id)
    dpo = PairObjective("dpo", reference=adapter.disabled)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        pairs = dpo.pair_logps(model, batch)
        alone, _ = sequence_logprobs(base, batch)
    torch.testing.assert_close(pairs.ref_chosen, alone[0::2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pairs.ref_rejected, alone[1::2], rtol=1e-6, atol=1e-6)
    assert (pairs.chosen - pairs.ref_chosen).abs().max() > 1e-3  # the adapter does act


def test_full_fine_tuning_has_no_adapter_to_switch_off():
    with pytest.raises(NotImplementedError, match="no base to switch back to"):
        build_adapter(AdapterConfig(method="full")).disabled(torch.nn.Linear(2, 2))


def test_pairs_packed_give_the_padded_log_probs(tiny):
    path, tokenizer = tiny
    _, model = lora(path, perturb=True)
    examples = pair_examples(tokenizer)
    bins = pack_batch([len(e.input_ids) for e in examples], 64)
    assert len(bins) < len(examples)  # several examples share a row
    with torch.no_grad():
        padded = sequence_logprobs(model, collate_padded(examples, tokenizer.pad_token_id))
        packed = sequence_logprobs(model, collate_packed(examples, bins, tokenizer.pad_token_id))
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed[1], padded[1])


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_a_few_steps_teach_the_preference(tiny, kind):
    """The loss falls and the chosen completions gain on the rejected ones: against the
    reference (DPO, IPO: the margin starts at 0), or in mean log-prob (SimPO, ORPO)."""
    path, tokenizer = tiny
    adapter, model = lora(path)
    batch = collate_padded(pair_examples(tokenizer), tokenizer.pad_token_id)
    objective = PairObjective(kind, reference=adapter.disabled)

    def gap() -> float:
        with torch.no_grad():
            p = objective.pair_logps(model, batch)
        c, r = p.margins() if objective.needs_reference else p.means()
        return float((c - r).mean())

    before = gap()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    acc = Accelerator(cpu=True)
    model.train()
    losses = [train_step(model, opt, [batch], acc, 1.0, objective).loss for _ in range(8)]
    assert losses[-1] < losses[0], losses
    assert gap() > before + 0.02, (before, gap())
    assert objective.take_metrics()["rewards/accuracies"] > 0.5
