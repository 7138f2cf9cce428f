"""Pairs in three layouts (padded, packed one row per completion, packed with the prompt
shared) give each completion the same log-prob, a reference's cached log-probs and KTO's
labels follow the pairs wherever packing puts them, and the shared layout takes fewer
positions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from leantune.data.preference import EncodedPreference
from leantune.model.logprobs import sequence_logprobs
from leantune.packing.pairs import PairBatcher

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("pairs"), "llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def pairs(vocab: int, n: int = 5) -> list[EncodedPreference]:
    g = torch.Generator().manual_seed(1)

    def ids(k: int) -> list[int]:
        return torch.randint(5, vocab, (k,), generator=g).tolist()

    return [EncodedPreference(ids(4 + 3 * i), ids(2 + i), ids(5 - i % 3),
                              label=bool(i % 2), ref=(-float(i), -float(i) - 0.5))
            for i in range(n)]


def per_pair(model, batcher: PairBatcher, items, mode: str) -> tuple[torch.Tensor, dict]:
    """Log-probs ``[P, 2]`` back in the given pairs' order, and the batch."""
    batch = batcher.collate_examples(items, mode)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch)
    out = torch.empty(len(items), 2)
    for j, o in enumerate(batch["pair_order"].tolist()):
        out[o] = sums[2 * j:2 * j + 2]
    return out, batch


@pytest.mark.parametrize("wide", [True, False])
def test_every_layout_gives_each_completion_the_same_log_prob(model, wide):
    items = pairs(model.config.vocab_size)
    # narrow: rows as wide as the longest completion with its prompt (what encoding
    # allows), so the widest trees get a row of their own
    max_length = 64 if wide else max(len(e.input_ids) for p in items for e in p.examples())
    base = PairBatcher(items, "online", max_length, 0, shared=True)
    padded, _ = per_pair(model, base.with_layout("none"), items, "none")
    packed, _ = per_pair(model, base.with_layout(shared=False), items, "online")
    shared, batch = per_pair(model, base, items, "online")
    assert torch.allclose(packed, padded, atol=1e-5)
    assert torch.allclose(shared, padded, atol=1e-5)
    assert batch["input_ids"].shape[1] <= max(max_length, max(map(base.length, items)))
    assert int(batch["num_examples"]) == 2 * len(items)


def test_cached_reference_and_labels_follow_the_pairs(model):
    items = pairs(model.config.vocab_size)
    batcher = PairBatcher(items, "online", 20, 0, shared=True)
    batch = batcher.collate_examples(items, "online")
    order = batch["pair_order"].tolist()
    assert sorted(order) == list(range(len(items))) and order != list(range(len(items)))
    want = torch.tensor([r for o in order for r in items[o].ref])
    assert torch.equal(batch["ref_logps"], want)
    assert batch["desirable"].tolist() == [items[o].label for o in order]
    items[0].ref = None  # one pair without: the batch computes its reference live
    assert "ref_logps" not in batcher.collate_examples(items, "online")


def test_the_prompt_is_laid_out_once(model):
    items = pairs(model.config.vocab_size)
    shared = PairBatcher(items, "online", 64, 0, shared=True)
    unshared = shared.with_layout(shared=False)
    for p, a, b in zip(items, shared.unit_lengths, unshared.unit_lengths):
        assert b - a == len(p.prompt)
    assert shared.layout == "packed+shared_prompt"
    assert unshared.layout == "packed" and shared.with_layout("none").layout == "padded"
