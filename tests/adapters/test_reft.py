"""LoReFT / DiReFT: the modules equal their formulas (R orthonormal, also after training),
the hooks edit only the chosen layers and positions, packed equals padded, batched
generation equals one prompt at a time and never edits generated tokens, and a saved
adapter reloads to bit-identical logits, on every architecture family."""

from __future__ import annotations

import pytest
import torch

from leantune.adapters import build_adapter, count_parameters, load_base
from leantune.adapters.reft import (
    PREFIX,
    SUFFIX,
    DiReFT,
    LoReFT,
    intervention_kinds,
    kinds_from_prompt,
    parse_positions,
    prompt_mask,
)
from leantune.config import AdapterConfig, ModelConfig
from leantune.data.encode import IGNORE, Encoded
from leantune.model.generate import generate
from leantune.packing.collate import collate_packed, collate_padded

from conftest import loss_sum, make_tokenizer, save_tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "phi", "gemma"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {a: save_tiny_model(tmp_path_factory.mktemp(a), a) for a in ARCHS}


def reft(model_dir: str, method: str = "loreft", perturb: bool = True, **kw):
    """A ReFT model on a tiny base; ``perturb`` moves the interventions off their identity
    start, as training would, so that they change what they touch."""
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(method=method, r=4, dropout=0.0, **kw))
    base = load_base(ModelConfig(name_or_path=model_dir, dtype="float32"), adapter)
    model = adapter.apply(base)
    if perturb:
        with torch.no_grad():
            for p in model.interventions.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return adapter, model


def examples(n: int = 4) -> list[Encoded]:
    """Prompt/completion examples of different lengths (the prompt is the untargeted part)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(5, 250, (3 + 4 * i,), generator=g).tolist()
        reply = torch.randint(5, 250, (5 + i,), generator=g).tolist()
        out.append(Encoded(prompt + reply, [IGNORE] * len(prompt) + reply))
    return out


@pytest.mark.parametrize("cls", [LoReFT, DiReFT])
def test_interventions_start_as_the_identity(cls, arch_dirs):
    h = torch.randn(7, 16)
    torch.testing.assert_close(cls(16, 4, dropout=0.0)(h), h, atol=1e-6, rtol=0)
    _, model = reft(arch_dirs["llama"], "loreft" if cls is LoReFT else "direft", perturb=False)
    batch = collate_padded(examples(2), 0)
    with torch.no_grad():
        edited = model(**{k: batch[k] for k in ("input_ids", "attention_mask",
                                                 "prompt_position", "prompt_length")}).logits
        plain = model.base(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(edited, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [LoReFT, DiReFT])
def test_interventions_equal_their_formulas(cls):
    torch.manual_seed(0)
    module = cls(16, 4, dropout=0.0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    h = torch.randn(7, 16)
    w, b = module.source.weight, module.bias
    if cls is LoReFT:
        r = module.rotation.weight
        torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)
        expected = h + (h @ w.T + b - h @ r.T) @ r
    else:
        expected = h + (h @ w.T + b) @ module.up.weight
    torch.testing.assert_close(module(h), expected)
    # Steps of the optimizer move R's unconstrained matrix; R itself stays orthonormal.
    if cls is LoReFT:
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.01)
        for _ in range(5):
            module(h).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        r = module.rotation.weight
        torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, kinds", [
    (20, [PREFIX] * 7 + [0] * 6 + [SUFFIX] * 7),
    (5, [PREFIX] * 2 + [SUFFIX] * 3),      # shorter than 7 + 7: split, suffix gets the odd one
    (1, [SUFFIX]),
    (0, []),
])
def test_positions_follow_the_short_prompt_rule(n, kinds):
    assert intervention_kinds(n, 7, 7) == kinds
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("l3") == (0, 3)


@pytest.mark.parametrize("prefix, suffix", [(7, 7), (2, 1), (0, 3), (5, 0), (1, 1)])
def test_the_batched_rule_equals_the_rule_for_one_prompt(prefix, suffix):
    """kinds_from_prompt (every position of a batch at once, as the model derives them
    from a collated batch) against intervention_kinds, prompt by prompt, for every
    prompt length up to 20, with completions and padding after each prompt."""
    lengths = list(range(21))
    width = 24
    position = torch.full((len(lengths), width), -1)
    length = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        position[row, :n], length[row, :n] = torch.arange(n), n
    got = kinds_from_prompt(position, length, prefix, suffix)
    for row, n in enumerate(lengths):
        assert got[row].tolist() == intervention_kinds(n, prefix, suffix) + [0] * (width - n)


def test_prompt_mask_follows_padding_on_either_side():
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask = prompt_mask(left, "f1+l2")
    assert mask.tolist() == [[0, 0, PREFIX, 0, SUFFIX, SUFFIX], [PREFIX, 0, 0, 0, SUFFIX, SUFFIX]]
    assert prompt_mask(left.flip(1), "f1+l2")[0].tolist() == [PREFIX, 0, SUFFIX, SUFFIX, 0, 0]


@pytest.mark.parametrize("tied, per_layer", [(True, 1), (False, 2)])
def test_parameter_count_is_2rd_plus_r_per_intervention(tied, per_layer, arch_dirs):
    _, model = reft(arch_dirs["llama"], layers=[0, 1], tied=tied)
    d, r = model.config.hidden_size, 4
    trainable, total = count_parameters(model)
    assert trainable == 2 * per_layer * (2 * r * d + r)
    assert total - trainable == count_parameters(model.base)[1]


def test_hooks_edit_only_the_chosen_layer_and_positions(arch_dirs):
    _, model = reft(arch_dirs["llama"], layers=[1], positions="f2+l1")
    model.eval()
    batch = collate_padded(examples(2), 0)
    seen = {}
    for i, layer in enumerate(model.base.model.layers):  # registered after ReFT's hooks
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              prompt_position=batch["prompt_position"], prompt_length=batch["prompt_length"])
        edited = dict(seen)
        base_logits = model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        plain = dict(seen)
        base_only = model.base(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    assert torch.equal(base_logits, base_only)  # no mask: the base model, bit for bit
    assert torch.equal(edited[0], plain[0])     # layer 0 is not chosen
    prompts = [int(n.max()) for n in batch["prompt_length"]]
    marked = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, n in enumerate(prompts):  # the rule, prompt by prompt: f2+l1
        marked[row, :n] = torch.tensor(intervention_kinds(n, 2, 1)) > 0
    assert torch.equal(edited[1][~marked], plain[1][~marked])  # unmarked positions untouched
    assert (edited[1][marked] - plain[1][marked]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_packed_rows_give_the_padded_loss(method, arch_dirs):
    _, model = reft(arch_dirs["llama"], method=method, positions="f2+l2")
    model.eval()
    exs = examples(4)
    padded = collate_padded(exs, 0)
    packed = collate_packed(exs, [[0, 3], [1, 2]], 0)
    with torch.no_grad():
        pad_sum, pad_n = loss_sum(model, padded)
        pack_sum, pack_n = loss_sum(model, packed)
        plain_sum, _ = loss_sum(model.base, padded)
    # Packing drops each example's first label (it would be predicted across examples).
    assert pad_n == pack_n
    torch.testing.assert_close(pack_sum, pad_sum, atol=1e-4, rtol=1e-5)
    assert abs(float(plain_sum - pad_sum)) > 1e-3  # the interventions do change the loss


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_round_trips_and_generates_in_batches(arch, arch_dirs, tmp_path):
    adapter, model = reft(arch_dirs[arch], positions="f2+l2")
    exs = examples(4)
    batch = collate_padded(exs, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        total, n = loss_sum(model, batch)
        (total / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(total / n))
    assert losses[-1] < losses[0] - 0.01, losses
    model.eval()

    adapter.save(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "reft_config.json", "reft_model.safetensors"}
    fresh = load_base(ModelConfig(name_or_path=arch_dirs[arch], dtype="float32"), adapter)
    # Loads from the directory alone: a different adapter config does not matter.
    reloaded = build_adapter(AdapterConfig(method="direft")).load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "prompt_position", "prompt_length")
        want = model(**{k: batch[k] for k in keys}).logits
        got = reloaded(**{k: batch[k] for k in keys}).logits
    assert torch.equal(want, got)

    tok = make_tokenizer()
    prompts = ["add 2 3", "What is the capital of France?", "hello"]
    together = generate(reloaded, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(reloaded, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    # ... and generation goes through the interventions (tiny random models may still
    # pick the same greedy tokens, so compare the first step's scores).
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = [m.generate(**enc, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0).scores[0]
                  for m in (reloaded, reloaded.base)]
    assert (scores[0] - scores[1]).abs().max() > 1e-4


def test_generated_tokens_are_never_edited(arch_dirs):
    _, model = reft(arch_dirs["llama"], positions="f1+l2")
    model.eval()
    ids = torch.randint(5, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        longer = gen.sequences[:, :7]  # the prompt and the first generated token
        mask = torch.tensor([[PREFIX, 0, 0, 0, SUFFIX, SUFFIX, 0]])  # the prompt's own only
        want = model(input_ids=longer, intervention_mask=mask).logits[:, -1]
        wrong = model(input_ids=longer, intervention_mask=prompt_mask(
            torch.ones_like(longer), "f1+l2")).logits[:, -1]
    torch.testing.assert_close(gen.scores[1], want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gen.scores[1], wrong, atol=1e-4)


def test_untied_layers_get_one_intervention_per_position_group_that_exists(arch_dirs):
    _, both = reft(arch_dirs["llama"], layers=[0], tied=False)
    _, suffix_only = reft(arch_dirs["llama"], layers=[0], tied=False, positions="l3")
    assert sorted(both.interventions) == ["layer0_prefix", "layer0_suffix"]
    assert sorted(suffix_only.interventions) == ["layer0_suffix"]


def test_gradient_checkpointing_recomputes_the_same_edits(arch_dirs):
    """Checkpointing re-runs each layer (and so the hooks) during backward."""
    batch = collate_padded(examples(3), 0)
    grads = []
    for checkpointing in (False, True):
        _, model = reft(arch_dirs["llama"], positions="f2+l2")
        if checkpointing:
            model.base.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        total, n = loss_sum(model, batch)
        (total / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
