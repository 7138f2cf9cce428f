"""The training loop: one function that reads top to bottom, on Accelerate.

``train(cfg)``: build the run (model, adapter, data, optimizer), evaluate before, then
repeat ``train_step`` -> log -> maybe evaluate -> maybe checkpoint until the step budget
is spent; evaluate after, save the adapter and write ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from leantune.adapters import build_adapter, count_parameters
from leantune.config import Config
from leantune.data.collate import collate_padded, epoch_batches
from leantune.data.dataset import Splits, build_splits
from leantune.data.encode import prompt_and_reference
from leantune.evaluate import evaluate
from leantune.generate import generate
from leantune.model import load_model, load_tokenizer, resolve_local
from leantune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leantune.train.flops import FlopModel
from leantune.train.metrics import MetricsLog, peak_memory_bytes, write_json
from leantune.train.run_dir import prepare_run_dir
from leantune.train.schedule import lr_multiplier, warmup_steps
from leantune.train.step import train_step

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides weights, optimizer and RNG that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches of `epoch` already consumed
    target_tokens: int = 0
    real_tokens: int = 0     # non-pad input tokens
    positions: int = 0       # input positions processed, pads included
    train_flops: int = 0
    eval_flops: int = 0
    train_seconds: float = 0.0
    last_loss: float = math.nan
    eval_loss_before: float | None = None
    eval_history: list[dict] = field(default_factory=list)  # every eval record so far


def micro_batches(splits: Splits, cfg: Config, state: TrainState, acc: Accelerator, pad_id: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches, forever, resuming at ``state``'s data position.

    Each global micro-batch holds ``batch_size * num_processes`` examples; process ``r``
    takes every ``num_processes``-th one starting at ``r``.
    """
    world, rank = acc.num_processes, acc.process_index
    while True:
        batches = epoch_batches(len(splits.train), cfg.train.batch_size * world, cfg.train.seed,
                                state.epoch)
        while state.batch_in_epoch < len(batches):
            indices = batches[state.batch_in_epoch]
            state.batch_in_epoch += 1
            if len(indices) < world:  # too small to give every process an example
                continue
            batch = collate_padded([splits.train[i] for i in indices[rank::world]], pad_id)
            yield {k: v.to(acc.device) for k, v in batch.items()}
        state.epoch += 1
        state.batch_in_epoch = 0


def total_steps(cfg: Config, n_train: int, world: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.train.batch_size * world)) / cfg.train.grad_accum)
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def sample_prompts(splits: Splits, tokenizer, n: int) -> list[tuple[str, str, bool]]:
    """The first ``n`` held-out prompts usable for generation (prompt, reference, special)."""
    found = []
    for ex in splits.eval_examples:
        if len(found) == n:
            break
        if (pr := prompt_and_reference(ex, tokenizer)) is not None:
            found.append(pr)
    return found


def train(cfg: Config) -> dict:
    """Train an adapter as ``cfg`` says; return the summary (also in ``summary.json``)."""
    started = time.time()
    acc = Accelerator()
    set_seed(cfg.train.seed)
    run_dir = prepare_run_dir(cfg, acc)
    with acc.main_process_first():  # one process dequantizes a GGUF, the others reuse it
        source = resolve_local(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed)
    adapter = build_adapter(cfg.adapter)
    model = adapter.apply(load_model(cfg.model, source))
    trainable, total = count_parameters(model)
    flop_model = FlopModel.of(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    steps = total_steps(cfg, len(splits.train), acc.num_processes)
    warmup = warmup_steps(steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)

    state = TrainState()
    resume_from = latest_checkpoint(run_dir) if cfg.train.resume else None
    if resume_from is not None:
        state = TrainState(**load_checkpoint(resume_from, adapter, acc.unwrap_model(model),
                                             optimizer))
        acc.print(f"resumed from {resume_from} (step {state.step} of {steps})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process,
                         state.step if resume_from else None)
    acc.print(f"model {cfg.model.name_or_path}: {trainable:,} trainable / {total:,} parameters "
              f"({100 * trainable / total:.3f} %), {len(splits.train)} train / "
              f"{len(splits.eval)} eval examples, {steps} optimizer steps")

    pad_id = tokenizer.pad_token_id
    prompts = sample_prompts(splits, tokenizer, cfg.eval.generate)
    eval_history = state.eval_history  # a resumed run's summary covers the whole run

    def run_eval(tag: str) -> dict | None:
        if not splits.eval:
            return None
        result = evaluate(model, splits.eval, cfg.eval.batch_size, pad_id, acc)
        state.eval_flops += sum(flop_model.forward(1, len(e.input_ids)) for e in splits.eval)
        record = {"step": state.step, "tag": tag, "eval_loss": result["loss"],
                  "eval_perplexity": result["perplexity"]}
        eval_history.append(record)
        metrics.write(record)
        return result

    if cfg.eval.before and resume_from is None:
        state.eval_loss_before = (run_eval("before") or {}).get("loss")
    # A resumed run's starting point is a checkpoint, not the base: no "before" replies.
    replies_before = _replies(model, tokenizer, prompts, cfg, acc) if resume_from is None else []

    batches = micro_batches(splits, cfg, state, acc, pad_id)
    bar = tqdm(total=steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not (cfg.train.progress and acc.is_main_process))
    model.train()
    while state.step < steps:
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        lr = cfg.optim.lr * lr_multiplier(state.step, steps, warmup, cfg.optim.schedule,
                                          cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = train_step(model, optimizer, micro, acc, cfg.optim.max_grad_norm)
        if not math.isfinite(result.loss):
            raise FloatingPointError(
                f"non-finite training loss ({result.loss}) at optimizer step {state.step + 1}; "
                f"the last good checkpoint is {latest_checkpoint(run_dir)}; lower optim.lr")
        _account(state, micro, result, flop_model, acc, time.perf_counter() - tick)
        tokens_per_s = state.real_tokens / max(state.train_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if state.step % cfg.train.log_every == 0 or state.step == steps:
            metrics.write({"step": state.step, "loss": result.loss, "lr": lr,
                           "grad_norm": result.grad_norm, "target_tokens": state.target_tokens,
                           "tokens": state.real_tokens, "train_flops": state.train_flops,
                           "tokens_per_second": tokens_per_s,
                           "elapsed_seconds": time.time() - started})
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < steps:
            run_eval("periodic")
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
            _save(run_dir, state, adapter, model, optimizer, cfg, acc)
    bar.close()

    after = run_eval("after")
    replies_after = _replies(model, tokenizer, prompts, cfg, acc)
    if not (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
        _save(run_dir, state, adapter, model, optimizer, cfg, acc)
    if acc.is_main_process:
        adapter.save(acc.unwrap_model(model), run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
    summary = _summary(cfg, splits, state, trainable, total, after, eval_history,
                       started, prompts, replies_before, replies_after)
    if acc.is_main_process:
        write_json(run_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return summary


def _account(state: TrainState, micro: list[dict], result, flop_model: FlopModel,
             acc: Accelerator, seconds: float) -> None:
    """Add one step's tokens (all processes), FLOPs and time to ``state``."""
    local = torch.tensor([[int(b["attention_mask"].sum()), b["input_ids"].numel(),
                           flop_model.train(*b["input_ids"].shape)] for b in micro],
                         dtype=torch.float64, device=acc.device).sum(0)
    real, positions, flops = acc.reduce(local, "sum").tolist()
    state.step += 1
    state.last_loss = result.loss
    state.target_tokens += result.target_tokens
    state.real_tokens += int(real)
    state.positions += int(positions)
    state.train_flops += int(flops)
    state.train_seconds += seconds


def _save(run_dir: Path, state: TrainState, adapter, model, optimizer, cfg: Config,
          acc: Accelerator) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(run_dir, state.step, adapter, acc.unwrap_model(model), optimizer,
                        asdict(state), cfg.checkpoint.keep_last_n)
    acc.wait_for_everyone()


def _replies(model, tokenizer, prompts, cfg: Config, acc: Accelerator) -> list[str]:
    if not prompts or not acc.is_main_process:
        return []
    return [generate(acc.unwrap_model(model), tokenizer, [p], cfg.eval.max_new_tokens, special)[0]
            for p, _, special in prompts]


def _summary(cfg: Config, splits: Splits, state: TrainState, trainable: int, total: int,
             after: dict | None, eval_history: list[dict], started: float,
             prompts, replies_before: list[str], replies_after: list[str]) -> dict:
    """The figures DESIGN.md lists for ``summary.json``, and a little more."""
    return {
        "method": cfg.adapter.method,
        "model": cfg.model.name_or_path,
        "train_tokens": {"target": state.target_tokens, "total": state.real_tokens},
        "optimizer_steps": state.step,
        "train_flops": state.train_flops,
        "eval_flops": state.eval_flops,
        "ff_flops": 0,  # the Fast Forward stage has not landed yet: no FF steps are taken
        "ff_stages": 0,
        "ff_steps_accepted": 0,
        "wall_seconds": time.time() - started,
        "train_seconds": state.train_seconds,
        "tokens_per_second": state.real_tokens / max(state.train_seconds, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable_params": trainable,
        "total_params": total,
        "eval_loss": {"before": state.eval_loss_before, "after": after and after["loss"]},
        "eval_history": eval_history,
        "final_train_loss": state.last_loss,
        "padding_fraction": 1 - state.real_tokens / max(state.positions, 1),
        "data": splits.stats.to_dict() | {"format": splits.format},
        "samples": [{"prompt": p, "reference": ref, "after": a,
                     "before": replies_before[i] if replies_before else None}
                    for i, ((p, ref, _), a) in enumerate(zip(prompts, replies_after))],
    }
