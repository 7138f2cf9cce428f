"""GRPO's loss against TRL's ``GRPOTrainer._compute_loss``, an implementation we did not
write: the same prompts, completions, advantages, old and reference log-probs and LoRA
weights; the loss and every LoRA gradient equal TRL's for each ``loss_type``, with and
without the KL term, laid out padded, packed, and as trees (each prompt once, its
completions as branches)."""

from __future__ import annotations

import copy

import pytest
import torch

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.objectives.grpo import GRPOObjective, completion_logprobs
from leantune.packing.rollouts import Rollout, collate_rollouts

from conftest import save_tiny_model

trl = pytest.importorskip("trl")

G, PROMPTS, MAX_COMPLETION = 4, 3, 6
LORA = AdapterConfig(method="lora", r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with a non-zero LoRA, TRL's trainer around it, and a fixed batch of
    prompt groups with completions of unequal lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_tiny_model(tmp_path_factory.mktemp("grpo_trl"), "llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(3)
    model = build_adapter(LORA).apply(AutoModelForCausalLM.from_pretrained(base))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(PROMPTS):
        prompt = tokenizer(f"Question {i}: what is {i} + {i + 2}?" + " ok" * i)["input_ids"]
        for j in range(G):
            n = 1 + (i + 2 * j) % MAX_COMPLETION
            rollouts.append(Rollout(prompt, torch.randint(5, len(tokenizer), (n,),
                                                          generator=g).tolist(), group=i))
    advantages = torch.randn(PROMPTS * G, generator=g)
    advantages[:G] = 0.0  # a tied group
    for r, a in zip(rollouts, advantages.tolist()):
        r.advantage = a
    return base, tokenizer, model, rollouts


def trl_trainer(base, tokenizer, model, tmp_path, **knobs):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                          bf16=False, per_device_train_batch_size=PROMPTS * G,
                          num_generations=G, max_completion_length=MAX_COMPLETION,
                          logging_steps=1, save_strategy="no", **knobs)
    return trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] *
                                                      len(completions)],
                           args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * 4),
                           processing_class=tokenizer)


def trl_inputs(rollouts, pad_id, old, ref):
    """TRL's layout: prompts left-padded, completions right-padded, per-token values
    ``[B, Lc]``."""
    lp, lc = max(len(r.prompt) for r in rollouts), max(len(r.completion) for r in rollouts)
    b = len(rollouts)
    out = {k: torch.zeros((b, n), dtype=torch.long) for k, n in
           (("prompt_ids", lp), ("prompt_mask", lp), ("completion_ids", lc),
            ("completion_mask", lc))}
    out["prompt_ids"].fill_(pad_id)
    out["completion_ids"].fill_(pad_id)
    for i, r in enumerate(rollouts):
        out["prompt_ids"][i, lp - len(r.prompt):] = torch.tensor(r.prompt)
        out["prompt_mask"][i, lp - len(r.prompt):] = 1
        out["completion_ids"][i, :len(r.completion)] = torch.tensor(r.completion)
        out["completion_mask"][i, :len(r.completion)] = 1
    out["advantages"] = torch.tensor([r.advantage for r in rollouts])
    mask = out["completion_mask"].bool()
    for key, values in (("old_per_token_logps", old), ("ref_per_token_logps", ref)):
        if values is not None:
            dense = torch.zeros((b, lc))
            dense[mask] = values
            out[key] = dense
    out["num_items_in_batch"] = mask.sum()
    return out


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,ratio", [(0.0, False), (0.0, True), (0.04, False), (0.04, True)])
@pytest.mark.parametrize("mode", ["none", "online", "trees"])
def test_loss_and_gradients_equal_trls(setup, tmp_path, loss_type, beta, ratio, mode):
    """With ``ratio`` the old log-probs differ from the policy's (num_iterations > 1), so
    the clip acts; the temperature scales the logits in both."""
    from accelerate.state import AcceleratorState

    base, tokenizer, model, rollouts = setup
    temperature, eps, eps_high = 0.7, 0.2, 0.28
    pad = tokenizer.pad_token_id
    n = sum(len(r.completion) for r in rollouts)
    model.train()
    ours = GRPOObjective(loss_type, beta, eps, eps_high, temperature)
    with torch.no_grad():
        batch = collate_rollouts(rollouts, mode, 64, pad, 0)
        lp = completion_logprobs(model, batch, temperature, True)[0]
    g = torch.Generator().manual_seed(1)
    old = lp + 0.3 * torch.randn(n, generator=g) if ratio else None
    ref = lp + 0.5 * torch.randn(n, generator=g) if beta else None
    count = {"grpo": len(rollouts), "dr_grpo": len(rollouts) * MAX_COMPLETION, "dapo": n}
    for r, k in zip(rollouts, torch.tensor([len(r.completion) for r in rollouts]).cumsum(0)):
        k, c = int(k), len(r.completion)
        r.old = old[k - c:k].tolist() if old is not None else None
        r.ref = ref[k - c:k].tolist() if ref is not None else None
    batch = collate_rollouts(rollouts, mode, 64, pad, count[loss_type])
    loss = ours.loss_sum(model, batch) / ours.count(batch)
    loss.backward()
    mine = grads(model)
    try:
        # A copy: with beta > 0 TRL adds a "ref" adapter to the model it is given
        trainer = trl_trainer(base, tokenizer, copy.deepcopy(model), tmp_path,
                              loss_type=loss_type, beta=beta,
                              epsilon=eps, epsilon_high=eps_high, temperature=temperature)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        theirs_loss = trainer._compute_loss(trainer.model, trl_inputs(rollouts, pad, old, ref))
        theirs_loss.backward()
        theirs = {n: g for n, g in grads(trainer.model).items() if ".ref." not in n}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        for r in rollouts:
            r.old = r.ref = None
    assert loss.item() == pytest.approx(theirs_loss.item(), rel=1e-5, abs=1e-7)
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-7)
    tally = ours.take_metrics()
    clipped = tally["clip_ratio/region_mean"]
    assert (clipped > 0) if ratio else clipped == 0
