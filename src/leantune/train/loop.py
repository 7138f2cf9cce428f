"""The training loop, on Accelerate: ``train(cfg)`` reads top to bottom and calls each
stage by name.

build_run -> (evaluate + sample replies before) -> repeat [train_step -> maybe a Fast
Forward stage -> log_step -> maybe evaluate -> maybe save_checkpoint] until the step
budget is spent -> finish (evaluate + replies after, final checkpoint, adapter,
``summary.json``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from leantune.adapters import (Adapter, build_adapter, count_parameters, load_base,
                               memory_footprint)
from leantune.config import Config
from leantune.data.batching import Batcher
from leantune.data.dataset import Splits, build_splits
from leantune.data.encode import prompt_and_reference
from leantune.evaluate import evaluate
from leantune.generate import generate
from leantune.model import (load_tokenizer, packing_error, packing_tolerance, resolve_dtype,
                            resolve_local)
from leantune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leantune.train.fast_forward import FastForward
from leantune.train.flops import FlopModel
from leantune.train.metrics import MetricsLog, PeakMemory, peak_memory_bytes, write_json
from leantune.train.run_dir import prepare_run_dir
from leantune.train.schedule import lr_multiplier, warmup_steps
from leantune.train.state import TrainState, epoch_plan, micro_batches, total_steps
from leantune.train.step import StepResult, train_step

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The parts of one training run, built once by :func:`build_run`."""

    cfg: Config
    acc: Accelerator
    run_dir: Path
    tokenizer: object
    splits: Splits
    adapter: Adapter
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    flop_model: FlopModel
    params: tuple[int, int]  # (trainable, total)
    base_memory: dict         # bytes of the base's weights: loaded / full precision
    batcher: Batcher
    packing: dict             # requested / used mode and the probe's error
    steps: int
    warmup: int
    state: TrainState
    metrics: MetricsLog
    resumed: bool
    started: float
    ff: FastForward | None
    train_memory: PeakMemory | None = None


def build_run(cfg: Config) -> Run:
    """Load model, data and adapter, make the optimizer, and restore a checkpoint if asked."""
    started = time.time()
    # Accelerate only turns a multi-process CPU launch (torchrun) into gloo DDP when told
    # it is on CPU.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    run_dir = prepare_run_dir(cfg, acc)
    with acc.main_process_first():  # one process dequantizes a GGUF, the others reuse it
        source = resolve_local(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    ff_cfg = cfg.fast_forward
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed,
                          ff_cfg.eval_examples if ff_cfg.enabled else 0)
    adapter = build_adapter(cfg.adapter)
    base = load_base(cfg.model, adapter, source, acc.device)
    base_memory = memory_footprint(base, resolve_dtype(cfg.model.dtype))
    model = adapter.apply(adapter.prepare_base(base))
    params = count_parameters(model)
    flop_model = FlopModel.of(model, adapter.virtual_tokens)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    packing = resolve_packing(cfg.data.packing, acc.unwrap_model(model), adapter)
    batcher = Batcher.build(splits.train, packing["used"], cfg.data.max_length,
                            tokenizer.pad_token_id, cfg.data.packing_strategy, adapter.positions)
    ff = build_fast_forward(cfg, model, splits, batcher, packing, flop_model, acc)
    steps = total_steps(cfg, len(epoch_plan(batcher.unit_lengths, cfg, acc.num_processes, 0)))
    warmup = warmup_steps(steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)
    state, resume_from = TrainState(), latest_checkpoint(run_dir) if cfg.train.resume else None
    if resume_from is not None:
        state = TrainState(**load_checkpoint(resume_from, adapter, acc.unwrap_model(model),
                                             optimizer))
        acc.print(f"resumed from {resume_from} (step {state.step} of {steps})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process,
                         state.step if resume_from else None)
    acc.print(f"model {cfg.model.name_or_path}: {params[0]:,} trainable / {params[1]:,} "
              f"parameters ({100 * params[0] / params[1]:.3f} %), {len(splits.train)} train / "
              f"{len(splits.eval)} eval examples, {steps} optimizer steps")
    return Run(cfg, acc, run_dir, tokenizer, splits, adapter, model, optimizer, flop_model,
               params, base_memory, batcher, packing, steps, warmup, state, metrics,
               resume_from is not None, started, ff)


def resolve_packing(requested: str, model: torch.nn.Module, adapter: Adapter | None = None
                    ) -> dict:
    """The packing mode to use: the requested one when this model and backend keep packed
    examples apart (probed, see :func:`~leantune.model.packing_error`), else padding,
    with a warning. Never contaminates silently."""
    if requested == "none":
        return {"requested": "none", "used": "none", "probe_error": None, "exact": False}
    if adapter is not None and not adapter.packs:
        log.warning("adapter.method=%s adds tokens to each row, not to each example: packed "
                    "rows would share them; using data.packing=none", adapter.name)
        return {"requested": requested, "used": "none", "probe_error": None, "exact": False,
                "reason": f"adapter.method={adapter.name} does not pack"}
    error = packing_error(model)
    exact = error <= packing_tolerance(model)
    used = requested
    if requested == "naive":
        log.warning("data.packing=naive: attention crosses example boundaries (benchmarks only)")
    elif not exact:
        used = "none"
        log.warning("this model/attention backend does not keep packed examples apart (relative "
                    "logit error %.2e); falling back to data.packing=none", error)
    return {"requested": requested, "used": used, "probe_error": error, "exact": exact}


def build_fast_forward(cfg: Config, model: torch.nn.Module, splits: Splits, batcher: Batcher,
                       packing: dict, flop_model: FlopModel, acc: Accelerator
                       ) -> FastForward | None:
    """The Fast Forward stage over every trainable tensor, judged on the FF set."""
    if not cfg.fast_forward.enabled:
        return None
    mode = eval_mode(packing)

    def ff_loss() -> float:
        return evaluate(model, splits.ff, cfg.eval.batch_size,
                        lambda b: batcher.collate_examples(b, mode), acc)["loss"]

    return FastForward(cfg.fast_forward, [p for p in model.parameters() if p.requires_grad],
                       ff_loss, flop_model.forward_each(len(e.input_ids) for e in splits.ff))


def eval_mode(packing: dict) -> str:
    """Held-out sets are packed whenever packing is exact here (same loss, less waste)."""
    return "online" if packing["exact"] and packing["requested"] != "none" else "none"


def train(cfg: Config) -> dict:
    """Train an adapter as ``cfg`` says; return the summary (also in ``summary.json``)."""
    run = build_run(cfg)
    state, acc = run.state, run.acc
    prompts = sample_prompts(run.splits, run.tokenizer, cfg.eval.generate)
    replies_before = []
    if not run.resumed:  # a resumed run starts from a checkpoint, not from the base
        if cfg.eval.before:
            state.eval_loss_before = (evaluate_and_log(run, "before") or {}).get("loss")
        replies_before = sample_replies(run, prompts)

    batches = micro_batches(run.batcher, cfg, state, acc)
    bar = tqdm(total=run.steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not (cfg.train.progress and acc.is_main_process))
    run.model.train()
    run.train_memory = PeakMemory()
    with run.train_memory:
        train_steps(run, batches, bar)
    bar.close()
    return finish(run, prompts, replies_before)


def train_steps(run: Run, batches, bar: tqdm) -> None:
    """Optimizer steps (each maybe followed by FF, eval, checkpoint) until the budget."""
    state, acc, cfg = run.state, run.acc, run.cfg
    while state.step < run.steps:
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        lr = set_lr(run)
        if run.ff is not None:
            run.ff.before_step(state.step + 1)
        result = train_step(run.model, run.optimizer, micro, acc, cfg.optim.max_grad_norm)
        check_finite(run, result)
        state.account(micro, result, run.flop_model, acc, time.perf_counter() - tick)
        fast_forward(run)
        log_step(run, result, lr, bar)
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < run.steps:
            evaluate_and_log(run, "periodic")
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
            checkpoint(run)


def set_lr(run: Run) -> float:
    """Set and return the LR of the coming step: ``optim.lr * lr_multiplier(step)``."""
    o = run.cfg.optim
    lr = o.lr * lr_multiplier(run.state.step, run.steps, run.warmup, o.schedule, o.min_lr_ratio,
                              o.decay_ratio, o.decay_shape, o.const_lr_ratio, o.cooldown_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def check_finite(run: Run, result: StepResult) -> None:
    """Stop on a NaN/inf loss, naming the step and the checkpoint that is still good."""
    if not math.isfinite(result.loss):
        raise FloatingPointError(
            f"non-finite training loss ({result.loss}) at optimizer step {run.state.step + 1}; "
            f"the last good checkpoint is {latest_checkpoint(run.run_dir)}; lower optim.lr")


def fast_forward(run: Run) -> None:
    """Run the Fast Forward stage due after this step, if any, and log it."""
    record = run.ff.after_step() if run.ff is not None else None
    if record is not None:
        run.state.account_ff(record)
        run.metrics.write({"step": run.state.step, "tag": "fast_forward", **record})


def log_step(run: Run, result: StepResult, lr: float, bar: tqdm) -> None:
    state = run.state
    bar.update(1)
    ff = {"ff": f"{state.ff_steps_accepted}/{state.ff_stages}"} if run.ff is not None else {}
    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}",
                    tok_s=f"{state.tokens_per_second:.0f}", pad=f"{state.padding_fraction:.1%}",
                    ex_row=f"{state.examples / max(state.rows, 1):.1f}", **ff)
    if state.step % run.cfg.train.log_every == 0 or state.step == run.steps:
        run.metrics.write({
            "step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "target_tokens": state.target_tokens, "tokens": state.real_tokens,
            "train_flops": state.train_flops, "ff_flops": state.ff_flops,
            "ff_steps_accepted": state.ff_steps_accepted,
            "tokens_per_second": state.tokens_per_second,
            "elapsed_seconds": time.time() - run.started})


def evaluate_and_log(run: Run, tag: str) -> dict | None:
    """Held-out loss now, appended to the eval history and ``metrics.jsonl``."""
    if not run.splits.eval:
        return None
    mode = eval_mode(run.packing)
    result = evaluate(run.model, run.splits.eval, run.cfg.eval.batch_size,
                      lambda batch: run.batcher.collate_examples(batch, mode), run.acc)
    run.state.eval_flops += run.flop_model.forward_each(len(e.input_ids) for e in run.splits.eval)
    record = {"step": run.state.step, "tag": tag, "eval_loss": result["loss"],
              "eval_perplexity": result["perplexity"]}
    run.state.eval_history.append(record)
    run.metrics.write(record)
    return result


def checkpoint(run: Run) -> None:
    """Save ``checkpoints/step-N`` (main process; every process waits for it)."""
    run.acc.wait_for_everyone()
    if run.acc.is_main_process:
        save_checkpoint(run.run_dir, run.state.step, run.adapter,
                        run.acc.unwrap_model(run.model), run.optimizer, asdict(run.state),
                        run.cfg.checkpoint.keep_last_n)
    run.acc.wait_for_everyone()


def sample_prompts(splits: Splits, tokenizer, n: int) -> list[tuple[str, str, bool]]:
    """The first ``n`` held-out prompts usable for generation (prompt, reference, special)."""
    found = []
    for ex in splits.eval_examples:
        if len(found) == n:
            break
        if (pr := prompt_and_reference(ex, tokenizer)) is not None:
            found.append(pr)
    return found


def sample_replies(run: Run, prompts: list[tuple[str, str, bool]]) -> list[str]:
    if not prompts or not run.acc.is_main_process:
        return []
    model = run.acc.unwrap_model(run.model)
    return [generate(model, run.tokenizer, [p], run.cfg.eval.max_new_tokens, special)[0]
            for p, _, special in prompts]


def finish(run: Run, prompts, replies_before: list[str]) -> dict:
    """Evaluate after, save the last checkpoint and the adapter, write ``summary.json``."""
    after = evaluate_and_log(run, "after")
    replies_after = sample_replies(run, prompts)
    every = run.cfg.checkpoint.every
    if not (every and run.state.step % every == 0):  # the loop saved this step already
        checkpoint(run)
    summary = build_summary(run, after, prompts, replies_before, replies_after)
    if run.acc.is_main_process:
        out = run.run_dir / run.adapter.output_name
        run.adapter.save(run.acc.unwrap_model(run.model), out)
        run.tokenizer.save_pretrained(out)
        write_json(run.run_dir / "summary.json", summary)
    run.acc.wait_for_everyone()
    return summary


def build_summary(run: Run, after: dict | None, prompts, replies_before: list[str],
                  replies_after: list[str]) -> dict:
    """The figures DESIGN.md lists for ``summary.json``, and a little more."""
    state, (trainable, total), mem = run.state, run.params, run.train_memory
    return {
        "method": run.cfg.adapter.method,
        "model": run.cfg.model.name_or_path,
        "train_tokens": {"target": state.target_tokens, "total": state.real_tokens},
        "optimizer_steps": state.step,
        "train_flops": state.train_flops,
        "eval_flops": state.eval_flops,
        "ff_flops": state.ff_flops,
        "ff_stages": state.ff_stages,
        "ff_steps_accepted": state.ff_steps_accepted,
        "ff_accepted_per_stage": state.ff_accepted_per_stage,
        "ff_seconds": state.ff_seconds,
        "wall_seconds": time.time() - run.started,
        "train_seconds": state.train_seconds,
        "tokens_per_second": state.tokens_per_second,
        # Two meters (rusage and sampled /proc) differ by a few pages: report the larger.
        "peak_memory_bytes": max(peak_memory_bytes(), mem.peak, mem.prior_peak) if mem
        else peak_memory_bytes(),
        # Memory at the first step and the peak during training (CUDA allocated, else
        # resident): their difference is what training itself added (activations,
        # gradients, optimizer state), apart from loading model and data.
        "train_memory_bytes": {"at_start": mem.base, "peak": mem.peak} if mem else None,
        "trainable_params": trainable,
        "total_params": total,
        "base_memory_bytes": run.base_memory,
        "eval_loss": {"before": state.eval_loss_before, "after": after and after["loss"]},
        "eval_history": state.eval_history,
        "final_train_loss": state.last_loss,
        "padding_fraction": state.padding_fraction,
        "packing": run.packing,
        "rows": state.rows,
        "examples": state.examples,
        "data": run.splits.stats.to_dict() | {"format": run.splits.format},
        "samples": [{"prompt": p, "reference": ref, "after": a,
                     "before": replies_before[i] if replies_before else None}
                    for i, ((p, ref, _), a) in enumerate(zip(prompts, replies_after))],
    }
