"""GRPO's rollout stage: each optimizer step's prompts, ``G`` completions sampled for each
from the policy as it is (:mod:`leantune.model.sampling`), scored by the reward
functions, turned into group advantages, and handed to the loop as packed training
micro-batches (:mod:`leantune.packing.rollouts`).

Per step and process: ``train.batch_size`` prompts per micro-batch, ``train.grad_accum``
micro-batches; prompt positions are dealt from seeded per-epoch shuffles of the training
prompts (process ``r`` of ``W`` takes every W-th), and each prompt's sampling generator
is seeded by ``(train.seed, its position in the global batch)``: the rollouts of a step
follow from the step number and the weights, so a resumed run samples what the
uninterrupted one did, and several processes sample what one process would. With
``num_iterations = mu > 1`` a generation serves ``mu`` steps; the rollouts in use travel
in the checkpoint's state (``grpo_pending``) with their old log-probs.

A group whose rewards all tie (every completion right, or every one wrong) has zero
advantage everywhere: with ``beta = 0`` its completions are left out of the forward
(counted in ``tied_groups``), keeping their share of the loss normalizer.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from leantune.config import Config
from leantune.data.prompt_sets import Prompt, PromptSplits
from leantune.model.flops import FlopModel
from leantune.model.load import evaluating
from leantune.model.sampling import sample
from leantune.objectives.base import Tally
from leantune.objectives.grpo import completion_logprobs, group_advantages, nanstd
from leantune.objectives.rewards import load_reward, score
from leantune.packing.rollouts import Rollout, collate_rollouts, packed_shape, tree_shape
from leantune.packing.trees import Tree, check_trees, mask_dtype_for
from leantune.train.metrics import all_means
from leantune.train.sharding import sharded
from leantune.train.state import TrainState

log = logging.getLogger(__name__)

SAMPLES_FILE = "rollouts.jsonl"
CHECK_PROMPTS = 2  # prompts the tree-mask check runs on
EVAL_BATCH = 32  # held-out prompts sampled together


class Rollouts:
    """The rollout stage of one run (module docstring)."""

    def __init__(self, cfg: Config, splits: PromptSplits, tokenizer, acc: Accelerator,
                 run_dir: Path | None = None):
        o = cfg.objective
        self.cfg, self.o, self.splits, self.tokenizer, self.acc = cfg, o, splits, tokenizer, acc
        self.rewards = [load_reward(spec) for spec in o.rewards]
        self.weights = o.reward_weights or [1.0] * len(o.rewards)
        self.beta = o.beta or 0.0
        self.mode = "online" if cfg.data.packing != "none" else "none"  # check_layout decides
        self.mask_dtype = torch.bool
        self.run_dir = run_dir
        self.reference: Callable[[torch.nn.Module], AbstractContextManager] | None = None
        self.reference_model: torch.nn.Module | None = None
        self.flop_model: FlopModel | None = None
        self.chunked = cfg.train.chunked_loss
        eos = tokenizer.eos_token_id
        self.stop = {eos} if eos is not None else set()
        self.seconds = 0.0
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def check_layout(self, model: torch.nn.Module, packed: bool) -> dict:
        """The training layout, decided once: trees (each prompt once) where
        ``objective.shared_prompt`` asks for them, packing is exact (``packed``) and the
        model honours the tree mask on the first prompts with stand-in completions
        (:func:`~leantune.packing.trees.check_trees`); else packed, else padded."""
        self.mode = "online" if packed else "none"
        self.mask_dtype = mask_dtype_for(model)
        record = {"layout": self.mode, "shared_prompt_check": None}
        if not (packed and self.o.shared_prompt):
            return record
        eos = self.tokenizer.eos_token_id
        trees = [Tree(p.ids, [[eos], self.tokenizer(str(p.columns.get("answer", "1")),
                                                     add_special_tokens=False)["input_ids"]
                              + [eos]]) for p in self.splits.train[:CHECK_PROMPTS]]
        reason = check_trees(model, trees, self.tokenizer.pad_token_id,
                             self.cfg.data.max_length)
        record["shared_prompt_check"] = reason or "exact"
        if reason is None:
            self.mode = record["layout"] = "trees"
        else:
            log.warning("rollouts: the shared-prompt layout is not exact on this model (%s); "
                        "each completion gets its prompt again", reason)
        return record

    # -- which prompts, which seed ------------------------------------------------------

    @property
    def per_generation(self) -> int:
        """Prompts per generation, all processes."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.acc.num_processes

    def steps(self, epochs: float) -> int:
        """Optimizer steps of ``epochs`` passes over the training prompts."""
        generations = max(1, round(epochs * len(self.splits.train) / self.per_generation))
        return generations * self.o.num_iterations

    def positions(self, generation: int) -> range:
        """This process's places in ``generation``'s global batch (every W-th)."""
        start = generation * self.per_generation
        return range(start + self.acc.process_index, start + self.per_generation,
                     self.acc.num_processes)

    def prompts_of(self, generation: int) -> list[Prompt]:
        """This process's prompts of ``generation``, micro-batch by micro-batch."""
        out = []
        for pos in self.positions(generation):
            epoch, k = divmod(pos, len(self.splits.train))
            out.append(self.splits.train[self._order(epoch)[k]])
        return out

    def _order(self, epoch: int) -> list[int]:
        """The training prompts' seeded shuffle of ``epoch`` (the last one kept)."""
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.splits.train)))
            random.Random(f"{self.cfg.train.seed}:prompts:{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def generators(self, generation: int) -> list[torch.Generator]:
        """One generator per prompt of this process's share of ``generation``, seeded by
        the prompt's place in the global batch: a prompt samples the same completions
        whichever process takes it (so two processes sample what one process with their
        joint batch does)."""
        return [torch.Generator(self.acc.device).manual_seed(
                    hash((self.cfg.train.seed, pos)) % 2**62)
                for pos in self.positions(generation)]

    # -- the loop's micro-batches --------------------------------------------------------

    def micro_batches(self, state: TrainState, model: torch.nn.Module, tally: Callable[[], Tally]
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """``train.grad_accum`` micro-batches per step, forever (the loop stops); ``tally``
        gives the objective's running tally, which the step's figures go into."""
        while True:
            generation = state.step // self.o.num_iterations
            pending = state.grpo_pending
            if pending is None or pending["generation"] != generation:
                tick = time.perf_counter()
                pending = self.generate(generation, model, state, tally())
                self.seconds += time.perf_counter() - tick
                state.grpo_pending = pending if self.o.num_iterations > 1 else None
            for micro, count in zip(pending["micro"], pending["counts"]):
                rollouts = [Rollout(**r) for r in micro]
                batch = collate_rollouts(rollouts, self.layout(rollouts),
                                         self.cfg.data.max_length,
                                         self.tokenizer.pad_token_id, count, self.mask_dtype)
                yield {k: v.to(self.acc.device) for k, v in batch.items()}

    def layout(self, rollouts: list[Rollout]) -> str:
        """This micro-batch's layout: trees (where exact) when they cost fewer training
        FLOPs than packed rows (long completions make a tree's attention dearer than the
        prompts it saves), else the run's packed or padded rows."""
        if self.mode != "trees":
            return self.mode
        if self.flop_model is None:
            return "trees"
        length = self.cfg.data.max_length
        heads = sum(len(r.completion) for r in rollouts)
        trees = self.flop_model.train(*tree_shape(rollouts, length), heads)
        packed = self.flop_model.train(*packed_shape(rollouts, length), heads)
        return "trees" if trees <= packed else "online"

    def synced(self) -> Callable[[bool], bool] | None:
        """:func:`sample`'s ``synced`` where every forward is collective (FSDP2): whether
        any process needs another forward (a sum over processes); None elsewhere."""
        if not sharded(self.acc):
            return None

        def any_process(mine: bool) -> bool:
            flag = torch.tensor(float(mine), device=self.acc.device)
            return bool(self.acc.reduce(flag, "sum") > 0)

        return any_process

    def take_seconds(self) -> float:
        """Seconds spent sampling and scoring since the last call."""
        out, self.seconds = self.seconds, 0.0
        return out

    def generate(self, generation: int, model: torch.nn.Module, state: TrainState,
                 tally: Tally) -> dict:
        """Sample, score and lay out one generation (module docstring)."""
        prompts = self.prompts_of(generation)
        g = self.o.num_generations
        completions = sample(self.acc.unwrap_model(model), [p.ids for p in prompts], g,
                             self.o.max_completion_length, self.o.temperature, self.o.top_p,
                             self.stop, self.tokenizer.pad_token_id, self.generators(generation),
                             self.synced())
        rewards, each, texts = self.score(prompts, completions, g)
        std = nanstd(self.acc.gather(rewards).view(1, -1))[0] if (
            self.o.scale_rewards == "batch") else None
        advantages, tied = group_advantages(rewards, g, self.o.scale_rewards, std)
        self.record(tally, state, prompts, completions, rewards, each, texts, tied, generation)
        micro, counts = [], []
        per_micro = self.cfg.train.batch_size
        for m in range(0, len(prompts), per_micro):
            rollouts, count = [], 0
            for i in range(m, min(m + per_micro, len(prompts))):
                for j in range(i * g, (i + 1) * g):
                    r = Rollout(prompts[i].ids, completions[j], float(advantages[j]), i)
                    count += self.units(r)
                    if not (self.beta == 0 and tied[i]):
                        rollouts.append(r)
            # A micro-batch of tied groups only still runs one (zero-advantage) completion:
            # every process must take part in the backward's gradient all-reduce.
            rollouts = rollouts or [Rollout(prompts[m].ids, completions[m * g], 0.0, m)]
            self.fill_logps(model, rollouts)
            micro.append([asdict(r) for r in rollouts])
            counts.append(count)
        return {"generation": generation, "micro": micro, "counts": counts}

    def units(self, r: Rollout) -> int:
        """The rollout's share of the loss normalizer, per ``objective.loss_type``."""
        return {"grpo": 1, "dr_grpo": self.o.max_completion_length,
                "dapo": len(r.completion)}[self.o.loss_type]

    def score(self, prompts: list[Prompt], completions: list[list[int]], g: int
              ) -> tuple[torch.Tensor, dict[str, list], list[str]]:
        """``(rewards [P*G], each function's values, the completions' texts)``; a reward is
        NaN where no function scored its completion."""
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rows = [p for p in prompts for _ in range(g)]
        shown = [[{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t
                 for p, t in zip(rows, texts)]
        columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
        total, each = score(self.rewards, self.weights, [p.prompt for p in rows], shown,
                            columns)
        rewards = torch.tensor(total, dtype=torch.float32)
        unscored = torch.tensor([all(v != v for v in vals) for vals in zip(*each.values())])
        return rewards.masked_fill(unscored, float("nan")), each, texts

    @torch.no_grad()
    def fill_logps(self, model: torch.nn.Module, rollouts: list[Rollout]) -> None:
        """The old policy's per-token log-probs (mu > 1) and the reference's (beta > 0),
        computed in the very layout the training forward will use."""
        if self.o.num_iterations == 1 and not self.beta:
            return
        batch = collate_rollouts(rollouts, self.layout(rollouts), self.cfg.data.max_length,
                                 self.tokenizer.pad_token_id, 0, self.mask_dtype)
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        inner = self.acc.unwrap_model(model)
        with evaluating(inner):  # no dropout: the policy the completions were sampled from
            if self.o.num_iterations > 1:
                for r, values in zip(rollouts, self.per_token(inner, batch)):
                    r.old = values
            if self.beta:
                ref = self.reference_model or inner
                with self.reference(ref) if self.reference else nullcontext():
                    for r, values in zip(rollouts, self.per_token(ref, batch)):
                        r.ref = values

    def per_token(self, model: torch.nn.Module, batch: dict) -> list[list[float]]:
        lp, _, owner = completion_logprobs(model, batch, self.o.temperature, self.chunked)
        lengths = torch.bincount(owner, minlength=int(batch["num_examples"])).tolist()
        return [part.tolist() for part in lp.float().cpu().split(lengths)]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Greedy completions of the held-out prompts (sharded over processes), scored:
        ``reward`` (the weighted sum) and ``rewards/NAME/mean`` per function, means over
        every process's prompts; {} without held-out prompts."""
        held_out, world = self.splits.eval, self.acc.num_processes
        mine = held_out[self.acc.process_index::world]
        tally = Tally()
        inner = self.acc.unwrap_model(model)
        synced = self.synced()
        # Under FSDP2 every process samples as many batches as the one with the most
        # prompts: an empty last batch samples the first prompt, unscored.
        most = len(mine) if synced is None else -(-len(held_out) // world)
        for k in range(0, most, EVAL_BATCH):
            prompts = mine[k:k + EVAL_BATCH]
            completions = sample(inner, [p.ids for p in prompts or held_out[:1]], 1,
                                 self.o.max_completion_length, 0.0, 1.0, self.stop,
                                 self.tokenizer.pad_token_id, synced=synced)
            if not prompts:
                continue
            rewards, each, _ = self.score(prompts, completions, 1)
            add_rewards(tally, rewards, each)
            tally.add("completions/mean_length",
                      torch.tensor([len(c) for c in completions], dtype=torch.float32))
        return all_means(tally, self.acc) if self.splits.eval else {}

    # -- figures ---------------------------------------------------------------------

    def record(self, tally: Tally, state: TrainState, prompts: list[Prompt],
               completions: list[list[int]], rewards: torch.Tensor, each: dict,
               texts: list[str], tied: torch.Tensor, generation: int) -> None:
        """TRL's rollout figures into ``tally``; counters into ``state``; a sample of the
        completions into ``rollouts.jsonl`` (main process)."""
        g = self.o.num_generations
        add_rewards(tally, rewards, each, spread=True)
        tally.add("reward_std", nanstd(rewards.view(-1, g)).nan_to_num(0.0))
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        ended = torch.tensor([bool(c) and c[-1] in self.stop for c in completions])
        tally.add("completions/mean_length", lengths)
        tally.add("completions/clipped_ratio", (~ended).float())
        tally.add("frac_reward_zero_std", tied.float())
        local = torch.tensor([int(lengths.sum()), len(tied), int(tied.sum()),
                              self.rollout_flops(prompts, completions, g)],
                             dtype=torch.float64, device=self.acc.device)
        tokens, groups, ties, flops = self.acc.reduce(local, "sum").tolist()
        state.rollout_tokens += int(tokens)
        state.groups += int(groups)
        state.tied_groups += int(ties)
        state.rollout_flops += int(flops)
        if self.run_dir is not None and self.acc.is_main_process and (
                generation % max(1, self.cfg.train.log_every) == 0):
            self.write_samples(generation, prompts[0], texts[:g], rewards[:g])

    def rollout_flops(self, prompts: list[Prompt], completions: list[list[int]], g: int) -> int:
        """Forward FLOPs of sampling: each prompt once, each completion's tokens with
        their context."""
        fm = self.flop_model
        if fm is None:
            return 0
        total = 0
        for i, p in enumerate(prompts):
            n = len(p.ids)
            total += fm.forward(1, n, 1)
            total += sum(fm.forward(1, n + len(c), len(c)) - fm.forward(1, n, 0)
                         for c in completions[i * g:(i + 1) * g])
        return total

    def trim_samples(self, generation: int) -> None:
        """Drop the samples of generations from ``generation`` on (a resumed run samples
        them again), so the file reads as one uninterrupted run."""
        path = self.run_dir / SAMPLES_FILE
        if self.acc.is_main_process and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if json.loads(line)["generation"] < generation]
            path.write_text("".join(line + "\n" for line in keep))

    def write_samples(self, generation: int, prompt: Prompt, texts: list[str],
                      rewards: torch.Tensor) -> None:
        record = {"generation": generation, "prompt": prompt.prompt, **prompt.columns,
                  "completions": [{"text": t, "reward": None if r != r else r}
                                  for t, r in zip(texts, rewards.tolist())]}
        with open(self.run_dir / SAMPLES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def add_rewards(tally: Tally, rewards: torch.Tensor, each: dict[str, list],
                spread: bool = False) -> None:
    """``reward`` (unscored completions as 0) and each function's ``rewards/NAME/mean``
    over the completions it scored; with ``spread`` its ``rewards/NAME/std`` too."""
    tally.add("reward", rewards.nan_to_num(0.0))
    for name, values in each.items():
        v = torch.tensor(values)
        tally.add(f"rewards/{name}/mean", v[~v.isnan()])
        if spread:
            tally.add(f"rewards/{name}/std", nanstd(v.view(1, -1)).nan_to_num(0.0))
