"""The rollout sampler: its KV-cache decode loop (prompt computed once per group, left
padding, finished rows leaving the batch) against a naive loop that recomputes the whole
sequence every token, seeded reproducibility, top-p, and the ``generate`` fallback."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.model.sampling import fast_path, pick, sample, sample_with_generate


@pytest.fixture(scope="module")
def lora_model(llama_dir):
    torch.manual_seed(0)
    model = build_adapter(AdapterConfig(method="lora", r=4, alpha=8.0, dropout=0.0)).apply(
        AutoModelForCausalLM.from_pretrained(llama_dir))
    with torch.no_grad():  # a LoRA that changes the model: samples must go through it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model, AutoTokenizer.from_pretrained(llama_dir)


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in ("a", "the sum of two", "add 3 and 4 now ok")]


@torch.no_grad()
def naive_greedy(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """No cache, no padding: the whole sequence again for every token."""
    ids, out = list(prompt), []
    for _ in range(max_new):
        t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t in stop:
            break
    return out


def test_greedy_decode_equals_a_loop_without_cache(lora_model):
    """Three prompts of different lengths (left-padded), two 'completions' each, and a
    stop set of frequent tokens so rows finish at different steps and leave the batch."""
    model, tok = lora_model
    model.eval()
    ps = prompts(tok)
    free = [naive_greedy(model, p, 12, set()) for p in ps]
    stop = {free[1][-1]}  # a token each row may meet at its own step, or never
    want = [naive_greedy(model, p, 12, stop) for p in ps]
    got = sample(model, ps, 2, 12, 0.0, 1.0, stop, tok.pad_token_id)
    assert got == [w for w in want for _ in range(2)]
    assert len({len(c) for c in got}) > 1  # rows finished at different steps


def test_seeded_sampling_repeats_and_differs_by_seed(lora_model):
    model, tok = lora_model
    ps = prompts(tok)

    def run(seed):
        return sample(model, ps, 4, 8, 1.0, 1.0, set(), tok.pad_token_id,
                      torch.Generator().manual_seed(seed))

    first = run(0)
    assert len(first) == 12 and all(len(c) == 8 for c in first)
    assert run(0) == first and run(1) != first
    assert len({tuple(c) for c in first[:4]}) > 1  # a group's completions differ


def test_pick_samples_the_softmax_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(pick(logits, 1.0, 1.0, g), minlength=4).float() / len(logits)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    # probabilities 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two, renormalized
    freq = torch.bincount(pick(logits, 1.0, 0.8, g), minlength=4).float() / len(logits)
    assert freq[2:].sum() == 0
    assert freq[0].item() == pytest.approx(0.64 / 0.88, abs=0.015)
    hot = torch.bincount(pick(logits, 2.0, 1.0, g), minlength=4).float() / len(logits)
    assert hot[0] < freq[0]  # a higher temperature flattens
    assert pick(logits[:3], 0.0, 1.0, None).tolist() == [0, 0, 0]


def test_models_the_loop_cannot_drive_go_through_generate(llama_dir):
    """Prompt tuning's virtual tokens and ReFT's prompt edits need ``generate``; greedy,
    both paths agree on a plain model."""
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert fast_path(base)
    prompt_tuned = build_adapter(AdapterConfig(method="prompt_tuning", num_virtual_tokens=4)
                                 ).apply(AutoModelForCausalLM.from_pretrained(llama_dir))
    reft = build_adapter(AdapterConfig(method="loreft", r=2)).apply(
        AutoModelForCausalLM.from_pretrained(llama_dir))
    assert not fast_path(prompt_tuned) and not fast_path(reft)
    ps = prompts(tok)
    assert sample(base, ps, 2, 6, 0.0, 1.0, set(), tok.pad_token_id) == sample_with_generate(
        base, ps, 2, 6, 0.0, 1.0, set(), tok.pad_token_id)
    out = sample(reft, ps, 2, 6, 1.0, 1.0, set(), tok.pad_token_id,
                 torch.Generator().manual_seed(0))
    assert len(out) == 6 and all(len(c) == 6 for c in out)


def test_a_prompts_own_generator_makes_its_samples_independent_of_the_batch(lora_model):
    """One generator per prompt: a prompt's completions are the same sampled alone or
    beside others (what lets two processes sample what one does)."""
    model, tok = lora_model
    ps = prompts(tok)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = sample(model, ps, 3, 8, 1.0, 1.0, set(), tok.pad_token_id, gens([5, 6, 7]))
    for i, seed in enumerate((5, 6, 7)):
        alone = sample(model, [ps[i]], 3, 8, 1.0, 1.0, set(), tok.pad_token_id, gens([seed]))
        assert alone == together[3 * i:3 * i + 3]


def test_synced_sampling_runs_every_process_forwards_and_samples_the_same(lora_model):
    """Under FSDP2 every forward is collective: a process whose rows are all done keeps
    running one-token forwards while ``synced`` says another process is not done. Here
    the "other process" needs 5 more forwards after this one's rows stop (each prompt's
    first greedy token is its stop token): the completions are those of the unsynced loop,
    and the forwards are as many as the other process runs."""
    model, tok = lora_model
    ps = prompts(tok)
    firsts = {s[0] for s in sample(model, ps, 1, 1, 0.0, 1.0, set(), tok.pad_token_id)}
    plain = sample(model, ps, 1, 8, 0.0, 1.0, firsts, tok.pad_token_id)
    assert all(len(c) == 1 for c in plain)  # done after one token: no decode forward
    asked, calls = [], []
    forward = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    def other_process_needs_five(mine: bool) -> bool:
        asked.append(mine)
        return mine or len(asked) <= 5

    model.forward = counted
    try:
        synced = sample(model, ps, 1, 8, 0.0, 1.0, firsts, tok.pad_token_id,
                        synced=other_process_needs_five)
    finally:
        del model.forward
    assert synced == plain
    assert asked == [False] * 6  # asked every step; this process never needed a forward
    assert len(calls) == 1 + 5  # the prefill, then one forward per step the other runs
    assert all(shape == (1, 1) for shape in calls[1:])  # idle: one token, no cache
