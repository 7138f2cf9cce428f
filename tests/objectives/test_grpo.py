"""GRPO's pieces against formulas written out here: group advantages per scale_rewards
(tied groups, rewards no function gave), the per-token log-probs and entropy under a
temperature (chunked head and plain head, packed and tree layouts agree), and each
loss_type's normalizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from leantune.objectives.grpo import GRPOObjective, completion_logprobs, group_advantages, nanstd
from leantune.packing.rollouts import Rollout, collate_groups, collate_rollouts


def test_group_advantages_follow_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   # a mixed group
                            1.0, 1.0, 1.0, 1.0,   # tied
                            0.5, float("nan"), 0.0, 1.0])  # one completion not scored
    adv, tied = group_advantages(rewards, 4, "group")
    assert tied.tolist() == [False, True, False]
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel, as TRL's nanstd
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert adv[4:8].tolist() == [0.0] * 4
    third = torch.tensor([0.5, 0.0, 1.0])
    want = (third - third.mean()) / (third.std() + 1e-4)
    torch.testing.assert_close(adv[[8, 10, 11]], want)
    assert adv[9] == 0.0  # unscored: no advantage
    none, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(none[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch, _ = group_advantages(rewards, 4, "batch", torch.tensor(2.0))
    torch.testing.assert_close(batch[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (2.0 + 1e-4))


def test_nanstd_is_torch_std_without_nans():
    x = torch.randn(5, 7)
    torch.testing.assert_close(nanstd(x), x.std(dim=1))
    assert nanstd(torch.tensor([[1.0, float("nan")]])).isnan().all()


@pytest.fixture(scope="module")
def model_and_rollouts(llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(3):
        prompt = torch.randint(5, 200, (4 + 3 * i,), generator=g).tolist()
        for j in range(3):
            rollouts.append(Rollout(prompt, torch.randint(5, 200, (1 + (i + j) % 4,),
                                                          generator=g).tolist(),
                                    advantage=float(j - 1), group=i))
    return model, rollouts


def direct(model, rollouts, temperature):
    """Each rollout alone, logits everywhere: log softmax(logits / T) at the completion."""
    lps, ents = [], []
    for r in rollouts:
        ids = torch.tensor([r.prompt + r.completion])
        logits = model(input_ids=ids).logits[0, len(r.prompt) - 1:-1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        lps.append(logp.gather(-1, torch.tensor(r.completion)[:, None]).squeeze(-1))
        ents.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(lps), torch.cat(ents)


@pytest.mark.parametrize("mode", ["none", "online", "trees"])
@pytest.mark.parametrize("chunked", [True, False])
def test_completion_logprobs_equal_each_rollout_alone(model_and_rollouts, mode, chunked):
    model, rollouts = model_and_rollouts
    model.eval()
    want_lp, want_ent = direct(model, rollouts, 0.7)
    batch = collate_rollouts(rollouts, mode, 64, 0, 0)
    with torch.no_grad():
        lp, ent, owner = completion_logprobs(model, batch, 0.7, chunked)
    # Trees order the branches as their rows hold them: back to the rollouts' order
    order = collate_groups(rollouts, 64, 0, torch.bool)[1] if mode == "trees" else rollouts
    lengths = [len(r.completion) for r in order]
    parts = dict(zip(map(id, order), zip(lp.split(lengths), ent.split(lengths))))
    lp = torch.cat([parts[id(r)][0] for r in rollouts])
    ent = torch.cat([parts[id(r)][1] for r in rollouts])
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    assert owner.tolist() == sorted(owner.tolist())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_loss_type_normalizes_as_written(model_and_rollouts, loss_type):
    """At ratio 1 (old = policy) and beta 0 the loss is -A summed per token, normalized:
    grpo by each completion's length then completions, dr_grpo by completions x the
    length cap, dapo by tokens."""
    model, rollouts = model_and_rollouts
    count = {"grpo": len(rollouts), "dr_grpo": len(rollouts) * 8,
             "dapo": sum(len(r.completion) for r in rollouts)}[loss_type]
    objective = GRPOObjective(loss_type, 0.0, 0.2, None, 1.0)
    loss = objective.loss_sum(model, collate_rollouts(rollouts, "online", 64, 0, count))
    per_rollout = [-r.advantage * (1 if loss_type == "grpo" else len(r.completion))
                   for r in rollouts]
    assert float(loss) / count == pytest.approx(sum(per_rollout) / count, abs=1e-6)
    assert objective.unit == {"grpo": "completions", "dr_grpo": "completion_slots",
                              "dapo": "completion_tokens"}[loss_type]
    assert not math.isnan(objective.take_metrics()["entropy"])
