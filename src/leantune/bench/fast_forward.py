"""``leantune bench fast-forward``: the paper's protocol (arXiv 2409.04206, section 4) on
the embedded default. Train plain LoRA for a fixed budget of optimizer steps and record
its final test loss; then train from the same initialization, on the same batches, with
Fast Forward until the test loss reaches that value. Report the FLOPs and the wall time
each run spent (FF's stages included) and their ratios, plus both test-loss curves
against FLOPs as a PNG.

Three disjoint sets of single user->assistant ShareGPT exchanges: train, the FF set
(judges FF steps) and the test set (judges the runs; used by neither). Test-set
evaluations are the measurement, not part of either run: they are neither timed nor
counted. Both runs use :class:`~leantune.train.fast_forward.FastForward` and
:func:`~leantune.train.step.train_step`, the very code ``leantune train`` runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from leantune.adapters import build_adapter
from leantune.bench.common import cpu_info, sharegpt_exchanges, task_examples
from leantune.config import AdapterConfig, ModelConfig, load_config
from leantune.data.encode import Encoded
from leantune.eval.loss import evaluate
from leantune.model.flops import FlopModel
from leantune.model.load import load_model, load_tokenizer, resolve_local
from leantune.model.logprobs import count_targets
from leantune.packing.batching import Batcher, epoch_batches
from leantune.train.fast_forward import FastForward, ff_set_size, halves_loss, split_halves
from leantune.train.step import train_step


def train_run(model, init: dict, batches: list[dict], lr: float, flop_model: FlopModel,
              acc: Accelerator, test_loss, ff: FastForward | None = None,
              target: float | None = None, test_every: int = 1, name: str = "") -> dict:
    """Train from ``init`` over ``batches`` (one optimizer step each); with ``target``,
    stop at the first test loss <= target. Returns the ledger and the test-loss curve."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[key])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    ledger = {"steps": 0, "train_flops": 0, "ff_flops": 0, "seconds": 0.0, "ff_seconds": 0.0,
              "ff_accepted_per_stage": [], "ff_stopped": [], "reached": False}
    curve = [{"step": 0, "flops": 0, "seconds": 0.0, "test_loss": test_loss()}]
    reached = (lambda loss: loss <= target) if target is not None else (lambda loss: False)

    def measure(step: int, note: str = "") -> bool:
        """A test-loss point on the curve (untimed, uncounted); True once at the target."""
        loss = test_loss()
        curve.append({"step": step, "flops": ledger["train_flops"] + ledger["ff_flops"],
                      "seconds": ledger["seconds"], "test_loss": loss})
        if name:
            print(f"{name} step {step}{note}: test loss {loss:.4f}, {ledger['seconds']:.0f} s",
                  flush=True)
        ledger["reached"] = reached(loss)
        return ledger["reached"]

    watched = [0.0]  # seconds spent on test losses inside stages: measurement, not cost

    def within_stage(accepted: int) -> bool:
        tick = time.perf_counter()
        loss = test_loss()
        watched[0] += time.perf_counter() - tick
        return reached(loss)

    if ff is not None:  # the target may be crossed inside a stage: look after each FF step
        ff.on_accept = within_stage
    for step, batch in enumerate(batches, start=1):
        tick = time.perf_counter()
        if ff is not None:
            ff.before_step(step)
        train_step(model, optimizer, [batch], acc, max_grad_norm=1.0)
        ledger["seconds"] += time.perf_counter() - tick
        step_flops = flop_model.train(*batch["input_ids"].shape, heads=count_targets(batch))
        ledger["train_flops"] += step_flops
        ledger["steps"] = step
        due = ff is not None and ff.pending
        if (step % test_every == 0 or due or step == len(batches)) and measure(step):
            break
        watched[0] = 0.0
        record = ff.after_step(step_flops) if ff is not None else None
        if record is not None:  # the stage's own seconds, FF-set evaluations included
            record["ff_seconds"] -= watched[0]
            ledger["seconds"] += record["ff_seconds"]
            ledger["ff_seconds"] += record["ff_seconds"]
            ledger["ff_flops"] += record["ff_flops"]
            ledger["ff_accepted_per_stage"].append(record["ff_accepted"])
            ledger["ff_stopped"].append(record["ff_stopped"])
            if measure(step, f", FF +{record['ff_accepted']}"):
                break
    return ledger | {"total_flops": ledger["train_flops"] + ledger["ff_flops"],
                     "test_loss": curve[-1]["test_loss"], "curve": curve}


def trainable_model(model_cfg: ModelConfig, source: str, method: str, r: int, alpha: float):
    """The base with LoRA or DoRA (all linear layers), or all of it trainable (``full``)."""
    cfg = AdapterConfig(method="full" if method == "full" else "lora", r=r, alpha=alpha,
                        dropout=0.0, use_dora=method == "dora")
    return build_adapter(cfg).apply(load_model(model_cfg, source))


def bench_sets(tokenizer, data: str, n_train: int, ff_examples: int, test_examples: int,
               max_length: int) -> tuple[list[Encoded], list[Encoded], list[Encoded]]:
    """Train, FF and test sets, disjoint. ``sharegpt``: single exchanges of the embedded
    ShareGPT, loss on the reply. ``task:SPEC``: train and FF rows from the tasks' train
    splits, test rows from their validation splits, loss on the answer."""
    if data == "sharegpt":
        rows = sharegpt_exchanges(tokenizer, n_train + ff_examples + test_examples, max_length,
                                  train_on="completion")
        return (rows[:n_train], rows[n_train:n_train + ff_examples],
                rows[n_train + ff_examples:])
    if not data.startswith("task:"):
        raise ValueError(f"--data: sharegpt or task:NAMES, got {data!r}")
    rows = task_examples(tokenizer, data.removeprefix("task:"), "train",
                         n_train + ff_examples, max_length)
    test = task_examples(tokenizer, data.removeprefix("task:"), "validation", test_examples,
                         max_length)
    return rows[:n_train], rows[n_train:], test


def bench_fast_forward(model_name: str = "embedded:smollm2", steps: int = 20,
                       batch_size: int = 64, max_length: int = 64, lr: float = 1e-4,
                       r: int = 16, alpha: float = 32.0, ff_examples: int | None = None,
                       test_examples: int = 32, interval: int | None = None, test_every: int = 2,
                       method: str = "lora", out: Path | None = None,
                       plot: Path | None = None, data: str = "sharegpt",
                       ff_overrides: list[str] = ()) -> dict:
    """Plain training for ``steps``, then training + FF until its test loss; see the
    module doc. ``method``: lora, dora or full (every weight trainable).
    ``ff_examples`` / ``interval`` None: ``leantune train``'s defaults for this step size
    (:func:`~leantune.train.fast_forward.ff_set_size`, ``fast_forward.interval``); the
    stage budget (``fast_forward.max_cost``) and two-half rule are the defaults too.
    ``ff_overrides``: ``KEY=VALUE`` settings of ``fast_forward``, read and checked as
    ``leantune train`` reads ``fast_forward.KEY=VALUE``."""
    torch.manual_seed(0)
    ff_cfg = load_config(None, ["fast_forward.enabled=true",
                                *(f"fast_forward.{kv}" for kv in ff_overrides)]).fast_forward
    if ff_examples is not None:
        ff_cfg.eval_examples = ff_examples
    if interval is not None:
        ff_cfg.interval = interval
    ff_examples, interval = ff_set_size(ff_cfg, batch_size), ff_cfg.interval
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model_cfg = ModelConfig(name_or_path=model_name)
    source = resolve_local(model_cfg)
    tokenizer = load_tokenizer(model_cfg, source)
    n_train = steps * batch_size
    train, ff_set, test = bench_sets(tokenizer, data, n_train, ff_examples, test_examples,
                                     max_length)
    model = trainable_model(model_cfg, source, method, r, alpha)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    flop_model = FlopModel.of(model)
    batcher = Batcher.build(train, "online", max_length, tokenizer.pad_token_id)
    batches = [batcher.collate(b) for b in epoch_batches(len(train), batch_size, 0, 0)]

    def measure(examples: list[Encoded]) -> dict:
        return evaluate(model, examples, 8, lambda b: batcher.collate_examples(b, "online"), acc)

    def loss_on(examples: list[Encoded]):
        return lambda: measure(examples)["loss"]

    setup = {"model": model_name, "data": data, "machine": cpu_info(),
             "method": "full" if method == "full" else f"{method} r{r} alpha{alpha:g} all-linear",
             "optimizer": f"AdamW lr {lr:g} constant, no weight decay, clip 1.0",
             "steps": steps, "batch_size": batch_size, "max_length": max_length,
             "train_examples": len(train), "ff_examples": len(ff_set),
             "test_examples": len(test), "interval": interval, "max_cost": ff_cfg.max_cost,
             "rule": "two halves must agree",
             "threads": torch.get_num_threads()}
    plain = train_run(model, init, batches, lr, flop_model, acc, loss_on(test),
                      test_every=test_every, name="plain")
    print(f"plain: {plain['steps']} steps, test loss {plain['test_loss']:.4f}, "
          f"{plain['seconds']:.0f} s", flush=True)
    ff = FastForward(ff_cfg, [p for p in model.parameters() if p.requires_grad],
                     halves_loss(split_halves(ff_set), measure),
                     flop_model.forward_examples(ff_set))
    fast = train_run(model, init, batches, lr, flop_model, acc, loss_on(test), ff=ff,
                     target=plain["test_loss"], test_every=1, name="fast forward")
    print(f"fast forward: {fast['steps']} steps, {sum(fast['ff_accepted_per_stage'])} FF steps "
          f"in {len(fast['ff_accepted_per_stage'])} stages, test loss {fast['test_loss']:.4f}, "
          f"{fast['seconds']:.0f} s", flush=True)
    results = {"setup": setup, "plain": plain, "fast_forward": fast,
               "reached_plain_test_loss": fast["reached"],
               "flops_saved": 1 - fast["total_flops"] / plain["total_flops"],
               "time_saved": 1 - fast["seconds"] / plain["seconds"]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if plot is not None:
        plot_curves(results, plot)
    return results


def plot_curves(results: dict, path: Path) -> None:
    """Test loss against FLOPs for both runs, with the plain run's final loss marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    method = results["setup"].get("method", "LoRA").split()[0]
    for key, label in (("plain", method), ("fast_forward", f"{method} + Fast Forward")):
        curve = results[key]["curve"]
        ax.plot([c["flops"] for c in curve], [c["test_loss"] for c in curve], marker=".",
                label=label)
    ax.axhline(results["plain"]["test_loss"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("FLOPs (training + FF stages)")
    ax.set_ylabel("test loss")
    s = results["setup"]
    ax.set_title(f"{s['model']}: FLOPs saved {results['flops_saved']:.0%}, "
                 f"time saved {results['time_saved']:.0%}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(results: dict) -> str:
    p, f = results["plain"], results["fast_forward"]
    rows = ["| run | optimizer steps | FF steps (stages) | FLOPs | seconds | test loss |",
            "|---|---|---|---|---|---|",
            f"| plain | {p['steps']} | – | {p['total_flops']:.3g} | {p['seconds']:.0f} | "
            f"{p['test_loss']:.4f} |",
            f"| + Fast Forward | {f['steps']} | {sum(f['ff_accepted_per_stage'])} "
            f"({len(f['ff_accepted_per_stage'])}) | {f['total_flops']:.3g} | {f['seconds']:.0f} | "
            f"{f['test_loss']:.4f} |"]
    verdict = ("reached" if results["reached_plain_test_loss"]
               else "did NOT reach (savings below are for an unfinished run)")
    rows.append(f"\nFF {verdict} the plain run's test loss: FLOPs saved "
                f"{results['flops_saved']:.1%}, wall time saved {results['time_saved']:.1%}")
    return "\n".join(rows)
