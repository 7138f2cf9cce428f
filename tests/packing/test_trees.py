"""A prompt shared by its completions (a tree row) gives each completion the log-probs,
and a preference loss the gradients, that padded rows of their own give; the prompt's
positions are computed once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.data.preference import PreferenceStats, encode_preference, to_preference
from leantune.data.rows import Row
from leantune.model.logprobs import sequence_logprobs
from leantune.objectives.preference import PairObjective
from leantune.packing.collate import collate_padded
from leantune.packing.trees import collate_trees, mask_dtype_for, pair_tree

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("trees"), "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = []
    for i in range(6):
        record = {"prompt": f"question {i}: add {i} and {2 * i} please =",
                  "chosen": f" {3 * i}, the sum", "rejected": f" {3 * i + 1}?"}
        pairs.append(encode_preference(to_preference(Row("p.jsonl", f"line {i}", record), "pairs"),
                                       tokenizer, 128, PreferenceStats()))
    return path, tokenizer, pairs


def lora_model(path: str):
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(method="lora", r=4, alpha=8.0, dropout=0.0))
    model = adapter.apply(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return adapter, model


def layouts(pairs, tokenizer, model):
    padded = collate_padded([e for p in pairs for e in p.examples()], tokenizer.pad_token_id)
    trees = [pair_tree(p.prompt, p.chosen, p.rejected) for p in pairs]
    bins = [[0, 3], [1, 4, 5], [2]]  # several pairs side by side, out of order
    assert max(sum(trees[i].length for i in b) for b in bins) <= 256
    tree_batch, _ = collate_trees([[trees[i] for i in b] for b in bins], tokenizer.pad_token_id,
                                  mask_dtype_for(model))
    return padded, tree_batch, bins


def test_shared_prompts_give_the_padded_log_probs_in_fewer_positions(setup):
    path, tokenizer, pairs = setup
    _, model = lora_model(path)
    model.eval()
    padded, tree, bins = layouts(pairs, tokenizer, model)
    assert len(bins) < len(pairs)  # several pairs share a row too
    assert int(tree["token_mask"].sum()) < int(padded["token_mask"].sum())  # prompts once
    with torch.no_grad():
        want, n_want = sequence_logprobs(model, padded)
        got, n_got = sequence_logprobs(model, tree)
    order = [2 * i + k for b in bins for i in b for k in (0, 1)]  # trees go in row order
    torch.testing.assert_close(got, want[order], rtol=1e-5, atol=1e-5)
    assert torch.equal(n_got, n_want[order])


def test_a_dpo_step_has_the_padded_gradients_on_shared_prompts(setup):
    path, tokenizer, pairs = setup
    adapter, model = lora_model(path)
    model.eval()  # the same function in both layouts (no dropout anyway)
    padded, tree, bins = layouts(pairs, tokenizer, model)
    order = [i for b in bins for i in b]
    same_order = collate_padded([e for i in order for e in pairs[i].examples()],
                                tokenizer.pad_token_id)
    grads = []
    for batch in (same_order, tree):
        dpo = PairObjective("dpo", reference=adapter.disabled)
        model.zero_grad(set_to_none=True)
        loss = dpo.loss_sum(model, batch) / dpo.count(batch)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert len(grads[0]) > 0
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_pair_tree_needs_a_prompt():
    with pytest.raises(ValueError, match="needs a prompt"):
        pair_tree([], [1], [2])


def test_the_tree_check_passes_a_model_that_honours_the_mask_and_names_one_that_does_not(
        setup):
    from leantune.packing.trees import check_trees

    path, tokenizer, pairs = setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trees = [pair_tree(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert check_trees(model, trees, tokenizer.pad_token_id, 256) is None

    class MaskBlind(torch.nn.Module):  # drops the tree mask: every token attends causally
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, attention_mask=None, **kw):
            return self.inner(**kw)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    reason = check_trees(MaskBlind(), trees, tokenizer.pad_token_id, 256)
    assert reason is not None and "does not honour the tree mask" in reason
