"""The training loop, on Accelerate: ``train(cfg)`` reads top to bottom and calls each
stage by name.

build_run -> (evaluate + sample replies before) -> repeat [train_step -> maybe a Fast
Forward stage -> log_step -> maybe evaluate -> maybe save_checkpoint] until the step
budget is spent -> finish (evaluate + replies after, final checkpoint, adapter,
``summary.json``). ``leantune train`` then writes ``report/`` from the run directory
(:func:`leantune.report.report_after_training`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

from tqdm.auto import tqdm

from leantune.common.files import write_json
from leantune.config import Config
from leantune.data.encode import prompt_and_reference
from leantune.eval.loss import evaluate
from leantune.eval.multiple_choice import macro
from leantune.model.generate import generate
from leantune.model.load import first_line
from leantune.model.mfu import mfu
from leantune.train.build import Run, build_run, eval_mode
from leantune.train.checkpoint import (
    accelerate_format,
    latest_checkpoint,
    save_accelerate_checkpoint,
    save_checkpoint,
    save_output,
)
from leantune.train.metrics import PeakMemory, all_means, peak_memory_bytes
from leantune.train.sharding import sharded
from leantune.train.step import StepResult, train_step
from leantune.train.summary import build_summary

__all__ = ["Run", "build_run", "train"]

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """Train an adapter as ``cfg`` says; return the summary (also in ``summary.json``)."""
    run = build_run(cfg)
    state, acc = run.state, run.acc
    prompts = sample_prompts(run.data.prompts_from, run.tokenizer, cfg.eval.generate)
    replies_before = []
    if not run.resumed:  # a resumed run starts from a checkpoint, not from the base
        if cfg.eval.before:
            state.eval_loss_before = (evaluate_and_log(run, "before") or {}).get("loss")
            score_tasks(run, "before")
        replies_before = sample_replies(run, prompts)

    batches = (run.data.rollouts.micro_batches(state, run.model, lambda: run.objective.tally)
               if run.data.rollouts is not None
               else run.data.micro_batches(cfg, state, acc, run.steps))
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
        sampling = run.data.rollouts.take_seconds() if run.data.rollouts is not None else 0.0
        state.rollout_seconds += sampling
        lr = set_lr(run)
        if run.ff is not None:
            run.ff.before_step(state.step + 1)
        result = run_step(run, micro)
        check_finite(run, result)
        flops = state.train_flops
        state.account(micro, result, run.flop_model, acc,
                      time.perf_counter() - tick - sampling, run.objective)
        fast_forward(run, state.train_flops - flops)
        log_step(run, result, lr, bar)
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < run.steps:
            evaluate_and_log(run, "periodic")
        if (cfg.eval.tasks_every and state.step % cfg.eval.tasks_every == 0
                and state.step < run.steps):
            score_tasks(run, "periodic")
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
            checkpoint(run)


def run_step(run: Run, micro: list) -> StepResult:
    """:func:`train_step` on the step's micro-batches, with the compiled layers where
    ``train.compile`` asked for them. A step that fails compiled is taken again eagerly
    (no update was made: its gradients are dropped first); if that succeeds, the compile
    was at fault, and the run goes on eagerly, saying why."""
    def step() -> StepResult:
        return train_step(run.model, run.optimizer, micro, run.acc,
                          run.cfg.optim.max_grad_norm, run.objective)

    if run.compiled is None:
        return step()
    tick = time.perf_counter()
    try:
        with run.compiled.active():
            result = step()
    except Exception as e:  # noqa: BLE001 - dynamo, inductor and the C++ compiler raise anything
        run.optimizer.zero_grad(set_to_none=True)
        result = step()  # an error that is not the compile's is raised here, eagerly
        cause = getattr(e, "inner_exception", None) or e  # dynamo wraps the backend's error
        reason = f"{type(cause).__name__}: {first_line(cause)}"
        log.warning("train.compile: the compiled step failed (%s); training eagerly", reason)
        run.compiled = None
        run.compile.update(used=False, reason=f"failed at step {run.state.step + 1}: {reason}")
        return result
    run.compile.setdefault("first_step_s", round(time.perf_counter() - tick, 2))
    return result


def set_lr(run: Run) -> float:
    """Set and return the LR of the coming step: ``optim.lr * schedule(step)``."""
    lr = run.cfg.optim.lr * run.schedule(run.state.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.state.last_lr = lr
    return lr


def check_finite(run: Run, result: StepResult) -> None:
    """A step that made no update (NaN/inf loss or gradient): stop, naming the step and the
    checkpoint that is still good, or (``train.on_nonfinite=skip``) count it and go on."""
    if result.applied:
        return
    step = run.state.step + 1
    what = (f"loss {result.loss}" if not math.isfinite(result.loss)
            else f"gradient norm {result.grad_norm}")
    if run.cfg.train.on_nonfinite == "skip":
        run.state.nonfinite_steps.append(step)
        log.warning("optimizer step %d: non-finite %s; its update was dropped (%d so far)",
                    step, what, len(run.state.nonfinite_steps))
        return
    packed = run.packing["used"] != "none"
    padding_fails_too = run.packing["probe"] and not run.packing["probe"]["padded_finite"]
    if packed and step == 1 and not padding_fails_too:  # no update yet: not the LR's doing
        raise FloatingPointError(
            f"non-finite {what} at optimizer step 1 with data.packing={run.packing['used']} "
            "(no update was made): packed rows are the likely cause (the packing probe "
            "passed on the first micro-batch, so another batch's layout differs); retry with "
            "data.packing=none, and if that fails too, the model or data is at fault "
            "(train.on_nonfinite=skip drops such steps)")
    raise FloatingPointError(
        f"non-finite {what} at optimizer step {step} (no update was made); the last good "
        f"checkpoint is {latest_checkpoint(run.run_dir)}; lower optim.lr"
        + (", or try data.packing=none" if packed else "")
        + ", or set train.on_nonfinite=skip to drop such steps and go on")


def fast_forward(run: Run, step_flops: int) -> None:
    """Run the Fast Forward stage due after this step (``step_flops``: its training FLOPs,
    all processes, which bound the stage's), if any, and log it."""
    record = run.ff.after_step(step_flops) if run.ff is not None else None
    if record is not None:
        run.state.account_ff(record)
        run.metrics.write({"step": run.state.step, "tag": "fast_forward", **record,
                           **progress(run)})


def progress(run: Run) -> dict:
    """Where the run stands, for the report's x-axes: tokens trained on, FLOPs spent on
    steps and Fast Forward together, and seconds spent in them (all carried across a
    resume)."""
    state = run.state
    return {"tokens": state.real_tokens, "flops": state.train_flops + state.ff_flops,
            "compute_seconds": state.train_seconds + state.ff_seconds}


def log_step(run: Run, result: StepResult, lr: float, bar: tqdm) -> None:
    """The progress bar and (every ``train.log_every`` steps) a ``metrics.jsonl`` line;
    an objective's own figures (a preference loss's ``rewards/*``, ``logps/*``) are means
    over the steps since the last line."""
    state = run.state
    bar.update(1)
    ff = {"ff": f"{state.ff_steps_accepted}/{state.ff_stages}"} if run.ff is not None else {}
    logged = state.step % run.cfg.train.log_every == 0 or state.step == run.steps
    figures = all_means(run.objective.take_tally(), run.acc) if logged else {}
    run.figures = figures or run.figures
    if "rewards/accuracies" in figures:
        ff["acc"] = f"{figures['rewards/accuracies']:.2f}"
    if run.data.rollouts is not None:
        ff |= {"reward": f"{run.figures.get('reward', math.nan):.2f}",
               "roll_tok_s": f"{state.rollout_tokens / max(state.rollout_seconds, 1e-9):.0f}"}
    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}",
                    tok_s=f"{state.tokens_per_second:.0f}", pad=f"{state.padding_fraction:.1%}",
                    ex_row=f"{state.examples / max(state.rows, 1):.1f}", **ff, **mfu_postfix(run))
    if logged:
        run.metrics.write({
            "step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "target_tokens": state.target_tokens, "train_flops": state.train_flops,
            "ff_flops": state.ff_flops, **progress(run),
            "ff_steps_accepted": state.ff_steps_accepted,
            "tokens_per_second": state.tokens_per_second,
            "padding_fraction": state.padding_fraction,
            "peak_memory_bytes": peak_memory_bytes(),
            "elapsed_seconds": time.time() - run.started, **rollout_figures(run), **figures})


def rollout_figures(run: Run) -> dict:
    """GRPO's sampling so far: seconds, completion tokens, their rate, FLOPs, tied groups."""
    state = run.state
    if run.data.rollouts is None:
        return {}
    return {"rollout_seconds": state.rollout_seconds, "rollout_tokens": state.rollout_tokens,
            "rollout_tokens_per_second": state.rollout_tokens / max(state.rollout_seconds, 1e-9),
            "rollout_flops": state.rollout_flops,
            "tied_groups": state.tied_groups, "groups": state.groups}


def mfu_postfix(run: Run) -> dict:
    """The progress bar's MFU: training FLOPs so far over their seconds, of the peak."""
    fraction = mfu(run.state.train_flops, run.state.train_seconds, run.precision.peak_flops)
    return {"mfu": f"{fraction:.1%}"} if fraction is not None else {}


def evaluate_and_log(run: Run, tag: str) -> dict | None:
    """Loss on every held-out set now, appended to the eval history and ``metrics.jsonl``;
    returns the main set's result (None when it is empty). A GRPO run's held-out set is
    prompts: its greedy completions' rewards (:func:`evaluate_rewards`)."""
    if run.data.rollouts is not None:
        return evaluate_rewards(run, tag)
    mode = eval_mode(run.packing)
    results = {}
    for s in run.data.eval_sets:
        if not s.examples:
            continue
        with run.objective.separate_tally() as tally:
            results[s.name] = evaluate(run.model, s.examples, run.cfg.eval.batch_size,
                                       lambda b: run.data.batcher.collate_examples(b, mode),
                                       run.acc, run.objective)
        results[s.name]["figures"] = all_means(tally, run.acc)
        run.state.eval_flops += run.flop_model.forward_examples(s.examples)
    if not results:
        return None
    main = results.get(run.data.eval_sets[0].name)
    record = {"step": run.state.step, "tag": tag, "eval_loss": main and main["loss"],
              "eval_perplexity": main and main["perplexity"],
              "eval_sets": {name: {"loss": r["loss"], "perplexity": r["perplexity"],
                                   "target_tokens": r["target_tokens"], **r["figures"]}
                            for name, r in results.items()},
              **{f"eval_{k}": v for k, v in (main["figures"] if main else {}).items()}}
    run.state.eval_history.append(record)
    run.metrics.write(record | progress(run))
    return main


def evaluate_rewards(run: Run, tag: str) -> dict | None:
    """GRPO: held-out prompts answered greedily and scored, as ``eval_reward`` and
    ``eval_rewards/NAME/mean`` in the eval history and ``metrics.jsonl``."""
    figures = run.data.rollouts.evaluate(run.model)
    if not figures:
        return None
    record = {"step": run.state.step, "tag": tag, "eval_loss": None, "eval_perplexity": None,
              "eval_sets": {}, **{f"eval_{k}": v for k, v in figures.items()}}
    run.state.eval_history.append(record)
    run.metrics.write(record | progress(run))
    return {"loss": None, **figures}


def score_tasks(run: Run, tag: str) -> dict | None:
    """Multiple-choice accuracy on every task of ``eval.tasks`` now, appended to the task
    history and ``metrics.jsonl`` (None when there are none)."""
    if not run.tasks:
        return None
    results = {name: run.scorer.score(run.model, docs) for name, docs in run.tasks.items()}
    run.state.eval_flops += sum(r["flops"] for r in results.values())
    keep = ("docs", "acc", "acc_ci", "acc_norm", "acc_norm_ci")
    record = {"step": run.state.step, "tag": "tasks", "when": tag,
              "tasks": {name: {k: r[k] for k in keep} for name, r in results.items()},
              "macro": macro(results)}
    run.state.task_history.append(record)
    run.metrics.write(record | progress(run))
    return record


def checkpoint(run: Run) -> None:
    """Save ``checkpoints/step-N`` (main process; every process waits for it)."""
    if accelerate_format(run.cfg.checkpoint.format, run.acc):
        save_accelerate_checkpoint(run.run_dir, run.state.step, run.adapter, run.acc, run.model,
                                   asdict(run.state), run.cfg.checkpoint.keep_last_n)
        return
    run.acc.wait_for_everyone()
    if run.acc.is_main_process:
        save_checkpoint(run.run_dir, run.state.step, run.adapter,
                        run.acc.unwrap_model(run.model), run.optimizer, asdict(run.state),
                        run.cfg.checkpoint.keep_last_n)
    run.acc.wait_for_everyone()


def sample_prompts(examples, tokenizer, n: int) -> list[tuple[str, str, bool]]:
    """The first ``n`` held-out prompts usable for generation (prompt, reference, special)."""
    found = []
    for ex in examples:
        if len(found) == n:
            break
        if (pr := prompt_and_reference(ex, tokenizer)) is not None:
            found.append(pr)
    return found


def sample_replies(run: Run, prompts: list[tuple[str, str, bool]]) -> list[str]:
    """Greedy replies of the main process's model. Not under FSDP or DeepSpeed: there
    every forward is collective, and one process generating alone would hang the rest.
    A model whose generation fails (its cache code, not training's) gets none, with one
    log line: the replies are a sample, and the trained run must still be saved."""
    if not prompts or not run.acc.is_main_process or sharded(run.acc):
        return []
    model = run.acc.unwrap_model(run.model)
    try:
        return [generate(model, run.tokenizer, [p], run.cfg.eval.max_new_tokens, special)[0]
                for p, _, special in prompts]
    except Exception as e:  # noqa: BLE001 - nothing of the run depends on the sample
        log.error("sample replies: %s cannot generate (%s: %s); the run goes on without them",
                  type(model).__name__, type(e).__name__, first_line(e))
        return []


def finish(run: Run, prompts, replies_before: list[str]) -> dict:
    """Evaluate after, save the last checkpoint and the adapter, write ``summary.json``."""
    after = evaluate_and_log(run, "after")
    score_tasks(run, "after")
    replies_after = sample_replies(run, prompts)
    every = run.cfg.checkpoint.every
    if not (every and run.state.step % every == 0):  # the loop saved this step already
        checkpoint(run)
    summary = build_summary(run, after, prompts, replies_before, replies_after)
    # Sharded weights are gathered onto the main process (a collective: every process).
    full = run.acc.get_state_dict(run.model) if sharded(run.acc) else None
    if run.acc.is_main_process:
        save_output(run.run_dir, run.adapter, run.acc.unwrap_model(run.model), run.tokenizer,
                    full)
        write_json(run.run_dir / "summary.json", summary)
    run.acc.wait_for_everyone()
    for tracker in run.acc.trackers:  # TensorBoard/W&B, if asked for. Not end_training():
        tracker.finish()              # it also tears down the process group
    return summary
