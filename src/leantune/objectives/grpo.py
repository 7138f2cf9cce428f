"""GRPO (Shao et al. 2024, DeepSeekMath) on sampled completions, with TRL's loss types.

For a prompt's group of ``G`` completions with rewards ``r_1..r_G``, each completion's
advantage is (``scale_rewards``)::

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)     group: std over the group (Bessel)
                                                batch: std over the whole batch
    A_i = r_i - mean(r)                         none (Dr. GRPO)

(a completion no reward function scored gets A = 0). Per completion token ``t``, with
``lp`` the policy's log-probability of the sampled token under ``logits / temperature``,
``old`` the sampling policy's (``lp`` detached unless ``num_iterations > 1``) and
``ratio = exp(lp - old)``::

    l_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A)
          + beta ratio (exp(ref - lp) - (ref - lp) - 1)              (k3 KL, beta > 0)

The KL estimate is weighted by the ratio (TRL's default ``use_bias_correction_kl``):
its value is unchanged at ``ratio = 1``, but its gradient gains ``kl * d lp``, which
makes it the gradient of the KL of the policy being trained rather than of the
sampling policy's estimate.

summed per ``loss_type`` (TRL's definitions), in the objective contract's units
(:mod:`leantune.objectives.base`)::

    grpo:     sum_i mean_t l_it / completions                  count: completions
    dr_grpo:  sum_it l_it / (completions x max_completion)     count: completions x max
    dapo:     sum_it l_it / completion tokens                  count: completion tokens

each over the whole optimizer step (all micro-batches, all processes). A group whose
rewards all tie has A = 0 on every token: with ``beta = 0`` its completions carry no
gradient and the rollout stage leaves them out of the forward (they still count in the
normalizer, as they do in TRL's).

Batches carry (:mod:`leantune.train.rollouts`) ``grpo_advantages`` ``[E]`` (per
example, in ``example_index`` order), ``grpo_old_logps`` / ``grpo_ref_logps`` ``[N]``
(per completion token, examples in order, each example's tokens in order) where needed,
and ``grpo_count``, the example's share of the normalizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leantune.data.encode import IGNORE
from leantune.model.chunked_loss import CHUNK_ELEMENTS, chunked_head, linear_log_probs
from leantune.model.head import head_at
from leantune.model.logprobs import model_inputs, next_labels, select_positions
from leantune.model.precision import compute_dtype
from leantune.objectives.base import Objective

ADVANTAGE_EPS = 1e-4  # TRL's: a group's std of 0 must not divide


def group_advantages(rewards: torch.Tensor, size: int, scale: str,
                     batch_std: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [P*G], tied [P])`` for rewards ``[P*G]`` (groups contiguous; NaN: not
    scored); ``batch_std`` is the std of every process's rewards (``scale='batch'``)."""
    groups = rewards.view(-1, size)
    mean = groups.nanmean(dim=1, keepdim=True)
    std = nanstd(groups)
    tied = torch.isclose(std, torch.zeros_like(std)) | std.isnan()
    advantages = groups - mean
    if scale == "group":
        advantages = advantages / (std[:, None] + ADVANTAGE_EPS)
    elif scale == "batch":
        advantages = advantages / (batch_std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages.flatten(), nan=0.0), tied


def nanstd(groups: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of each row ignoring NaNs (NaN with fewer than two values)."""
    mean = groups.nanmean(dim=-1, keepdim=True)
    count = (~groups.isnan()).sum(-1)
    var = ((groups - mean) ** 2).nansum(-1) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def completion_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        temperature: float, chunked: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp, entropy, owner)``, each ``[N]`` over the batch's completion tokens, example
    by example (``owner``: each token's example, or a tree batch's branch), tokens in
    order: ``lp`` differentiable fp32 ``log softmax(logits / temperature)`` of the sampled
    token, ``entropy`` (no gradient) of that distribution. The head runs at the
    predicting positions only, or (``chunked``, a bias-free plain head) inside the
    log-softmax on ``h / temperature``."""
    if "target_at" in batch:  # trees: targets listed (leantune.packing.trees)
        row, at = batch["target_row"], batch["target_at"]
        targets, owner = batch["target_token"], batch["target_branch"]
        # a context's end predicts each branch's first token: positions repeat
        select, order = select_positions(batch["input_ids"].shape, row, at)
    else:
        labels = next_labels(batch)
        select = labels != IGNORE
        targets, order = labels[select], None
        owner = F.pad(batch["example_index"][:, 1:], (0, 1), value=-1)[select]
    head = chunked_head(model) if chunked else None
    if head is not None and head.bias is not None and temperature != 1:
        head = None
    hidden: list[torch.Tensor] | None = [] if head is not None else None
    with head_at(model, select, hidden):
        logits = model(**model_inputs(batch, model)).logits
    if hidden:
        h = hidden[-1] if order is None else hidden[-1][order]
        h = h / temperature if temperature != 1 else h
        dtype = compute_dtype(model)
        lp = linear_log_probs(h, head, targets, dtype)
        entropy = chunked_entropy(h.detach(), head, dtype)
    else:
        if logits.dim() == 3:  # the head ran everywhere
            logits = logits[:, -select.shape[1]:][select]
        logits = logits if order is None else logits[order]
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        lp = logp.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    order = torch.argsort(owner, stable=True)
    return lp[order], entropy[order], owner[order]


@torch.no_grad()
def chunked_entropy(hidden: torch.Tensor, head: torch.nn.Linear,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N]`` entropy of ``softmax(head(hidden))``, a chunk of rows at a time, the head's
    matmul in ``dtype`` (the model's compute dtype)."""
    rows = max(1, CHUNK_ELEMENTS // head.out_features)
    w = head.weight.to(dtype)
    b = head.bias.to(dtype) if head.bias is not None else None
    out = []
    for h in hidden.split(rows):
        logp = F.log_softmax(F.linear(h.to(dtype), w, b).float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class GRPOObjective(Objective):
    """The clipped surrogate (module docstring) on one micro-batch of rollouts."""

    name = "grpo"

    def __init__(self, loss_type: str = "dapo", beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, temperature: float = 1.0,
                 chunked: bool = True):
        self.loss_type, self.beta, self.temperature = loss_type, beta, temperature
        self.low, self.high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.chunked = chunked
        self.unit = {"grpo": "completions", "dr_grpo": "completion_slots",
                     "dapo": "completion_tokens"}[loss_type]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["grpo_count"])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lp, entropy, owner = completion_logprobs(model, batch, self.temperature, self.chunked)
        advantages = batch["grpo_advantages"].to(lp.dtype)[owner]
        old = batch["grpo_old_logps"] if "grpo_old_logps" in batch else lp.detach()
        ratio = torch.exp(lp - old)
        clipped = ratio.clamp(1 - self.low, 1 + self.high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        if self.beta:
            gap = batch["grpo_ref_logps"] - lp
            kl = torch.exp(gap) - gap - 1
            per_token = per_token + self.beta * kl * ratio
            self.tally.add("kl", kl)
        if self.loss_type == "grpo":  # each completion's token mean
            lengths = torch.bincount(owner, minlength=int(batch["num_examples"]))
            per_token = per_token / lengths[owner]
        low = (ratio < 1 - self.low) & (advantages < 0)
        high = (ratio > 1 + self.high) & (advantages > 0)
        self.tally.add("clip_ratio/low_mean", low.float())
        self.tally.add("clip_ratio/high_mean", high.float())
        self.tally.add("clip_ratio/region_mean", (low | high).float())
        self.tally.add("entropy", entropy)
        return per_token.sum()
