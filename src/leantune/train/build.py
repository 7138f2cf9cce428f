"""Building a run: model, adapter, optimizer, data and schedule, and where training starts
(afresh, resumed, from an earlier run's weights, or annealing a checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from transformers import AutoConfig

from leantune.adapters import Adapter, build_adapter, count_parameters, load_base, memory_footprint
from leantune.adapters.base import unique_parameters
from leantune.config import Config, ConfigError
from leantune.config.tasks import task_names
from leantune.data.tasks import ChoiceDoc, subset
from leantune.eval.loss import evaluate
from leantune.eval.multiple_choice import ChoiceScorer
from leantune.model.compile import CompiledBlocks
from leantune.model.flops import FlopModel
from leantune.model.load import evaluating, load_tokenizer, resolve_dtype, resolve_local
from leantune.model.precision import Precision, choose
from leantune.objectives import NEXT_TOKEN, Objective
from leantune.objectives.reference import FrozenCopy
from leantune.packing.pairs import PairBatcher
from leantune.packing.probe import probe_batches, resolve_packing
from leantune.packing.probe_compare import Rows
from leantune.train.data import TrainData, build_data, first_rows
from leantune.train.fast_forward import FastForward, halves_loss, split_halves
from leantune.train.loss_paths import check_batch, check_loss_paths, check_trains
from leantune.train.metrics import MetricsLog, PeakMemory, all_means
from leantune.train.preference import (
    build_objective,
    check_pair_layout,
    check_sft_data,
    fill_references,
    reference_mode,
)
from leantune.train.run_dir import check_free_space, output_bytes, prepare_run_dir
from leantune.train.schedule import Schedule, steps_or_ratio
from leantune.train.sharding import reshard
from leantune.train.start import Start, check_start, restore
from leantune.train.state import TrainState, change_world
from leantune.train.strategy import check_strategy, launch_request, shard_on_cpu
from leantune.train.trackers import project_configuration, start_trackers, tracker_names

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The parts of one training run, built once by :func:`build_run`."""

    cfg: Config
    acc: Accelerator
    run_dir: Path
    tokenizer: object
    data: TrainData
    adapter: Adapter
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    flop_model: FlopModel
    params: tuple[int, int]  # (trainable, total)
    base_memory: dict         # bytes of the base's weights: loaded / full precision
    packing: dict             # requested / used mode and the probe's error
    precision: Precision      # train.precision resolved, with the measured ratio and peak
    loss_paths: dict          # head_at_targets / chunked_loss: used or not, and why
    strategy: dict            # the distributed strategy run, and what the launch asked for
    steps: int
    schedule: Schedule
    state: TrainState
    start: Start
    metrics: MetricsLog
    started: float
    ff: FastForward | None
    tasks: dict[str, list[ChoiceDoc]]  # eval.tasks: multiple-choice documents per task
    scorer: ChoiceScorer | None
    train_memory: PeakMemory | None = None
    objective: Objective = NEXT_TOKEN  # what the steps, evaluations and FF set compute
    figures: dict = field(default_factory=dict)  # the objective's last logged figures
    compiled: CompiledBlocks | None = None  # train.compile: the layers, compiled for steps
    compile: dict = field(default_factory=lambda: {"requested": False, "used": False})

    @property
    def resumed(self) -> bool:
        return self.start.kind == "resume"


def build_run(cfg: Config) -> Run:
    """Load model, data and adapter, make the optimizer, and restore a checkpoint if asked."""
    started = time.time()
    # Accelerate only turns a multi-process CPU launch (torchrun) into gloo DDP when told
    # it is on CPU.
    trackers = tracker_names(cfg)
    requested = launch_request()  # before the Accelerator, which fails on DeepSpeed launches
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None,
                      project_config=project_configuration(cfg) if trackers else None)
    shard_on_cpu(acc, requested)
    strategy = check_strategy(acc, requested)
    adapter = build_adapter(cfg.adapter)
    check_sharded_adapter(adapter, strategy)  # before the run directory is made
    set_seed(cfg.train.seed)
    check_start(cfg)
    run_dir = prepare_run_dir(cfg, acc)
    with acc.main_process_first():  # one process dequantizes a GGUF, the others reuse it
        source = resolve_local(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    precision = choose_precision(cfg, source, acc)
    model_cfg = replace(cfg.model, dtype=precision.weight_dtype(
        cfg.model.dtype, trains_base=adapter.name == "full", cuda=acc.device.type == "cuda"))
    base = load_base(model_cfg, adapter, source, acc.device)
    base_memory = memory_footprint(base, resolve_dtype(model_cfg.dtype))
    model = adapter.apply(adapter.prepare_base(base))
    precision.prepare(model, acc.device.type, frozen_half=cfg.model.dtype == "auto")
    params = count_parameters(model)
    if acc.is_main_process:  # before any training: will the checkpoints fit on the disk?
        stored = sum(p.nbytes for p in unique_parameters(model) if p.requires_grad)
        check_free_space(run_dir, output_bytes(params[0], stored, cfg.checkpoint.keep_last_n,
                                               cfg.checkpoint.every is not None))
    flop_model = FlopModel.of(model, adapter.virtual_tokens)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    check_sft_data(cfg)
    data = build_data(cfg, tokenizer, packed_layout(cfg, adapter), acc,
                      shared=adapter.virtual_tokens == 0)
    first = first_rows(data, cfg, acc.num_processes)
    precision, loss_paths = check_model(cfg, acc.unwrap_model(model), first, tokenizer,
                                        adapter, acc, precision)
    packing = decide_packing(cfg, acc.unwrap_model(model), data, first, tokenizer.pad_token_id,
                             adapter, acc, flop_model)
    objective = build_objective(cfg, adapter, acc.unwrap_model(model), acc)  # copy: weights now
    ff = build_fast_forward(cfg, model, data, packing, flop_model, acc, objective)
    tasks, scorer = build_tasks(cfg, tokenizer, packing, adapter, acc, flop_model)
    reshard(model)  # what restore writes into the sharded parameters, the next forward sees
    state, start = restore(cfg, run_dir, adapter, acc.unwrap_model(model), optimizer, data.keys,
                           acc)
    if start.kind == "init":  # the run starts from those weights: so does a copied reference
        objective = build_objective(cfg, adapter, acc.unwrap_model(model), acc)
    world, size = state.world, state.batch_size or cfg.train.batch_size  # as saved
    now = (acc.num_processes, cfg.train.batch_size)
    rebatched = change_world(state, *now, cfg.data.token_budget is not None) and (
        start.kind in ("resume", "anneal"))
    steps, schedule = plan_steps(cfg, data, state, acc.num_processes, rebatched)
    if rebatched:
        log.warning("%s from %d processes on %d, %d rows each (was %d): the global batch goes "
                    "from %d to %d, the rest of epoch %d is re-batched, and the run ends at "
                    "step %d (was %s)", start.kind, world, now[0], now[1], size, world * size,
                    now[0] * now[1], state.epoch, steps, state.planned_steps)
    state.planned_steps = steps
    if start.kind != "fresh":
        acc.print(f"{start.describe()} (step {state.step} of {steps})")
    resume_step = state.step if start.kind == "resume" else None
    start_trackers(acc, cfg, resume_step)
    metrics = MetricsLog(run_dir / "metrics.jsonl", acc.is_main_process, resume_step,
                         acc if trackers else None)
    acc.print(f"model {cfg.model.name_or_path}: {params[0]:,} trainable / {params[1]:,} "
              f"parameters ({100 * params[0] / params[1]:.3f} %), {data.num_train}, "
              f"{held_out_count(data)}, "
              f"{steps} optimizer steps")
    run = Run(cfg, acc, run_dir, tokenizer, data, adapter, model, optimizer, flop_model,
              params, base_memory, packing, precision, loss_paths, strategy, steps,
              schedule, state, start, metrics, started, ff, tasks, scorer, objective=objective)
    fill_references(run, lambda b: data.batcher.collate_examples(b, eval_mode(packing)))
    if cfg.train.compile:
        compile_blocks(run)
    if data.rollouts is not None:
        prepare_rollouts(run)
    return run


def check_sharded_adapter(adapter: Adapter, strategy: dict) -> None:
    """Refuse, in one line, an adapter FSDP cannot shard: prompt tuning, whose virtual
    tokens PEFT looks up outside the model's forward, where FSDP2 holds them as shards.

    Raises:
        ConfigError: prompt tuning under FSDP.
    """
    if strategy["type"] == "FSDP" and adapter.virtual_tokens:
        raise ConfigError(
            f"adapter.method={adapter.name} cannot train under FSDP: PEFT looks its virtual "
            "tokens up outside the model's forward, where FSDP2 holds them as shards; its "
            "table is small enough for every process to hold, so launch with DDP instead "
            "(accelerate launch --multi_gpu --num_processes N)")


def compile_blocks(run: Run) -> None:
    """``train.compile``: the decoder layers compiled for the training steps (compiling
    happens in the first one), or a warning and eager steps where the model has none."""
    try:
        run.compiled = CompiledBlocks(run.acc.unwrap_model(run.model))
    except ValueError as e:
        log.warning("train.compile: %s; training eagerly", e)
        run.compile = {"requested": True, "used": False, "reason": str(e)}
        return
    run.compile = {"requested": True, "used": True, "blocks": len(run.compiled.blocks),
                   "block": type(run.compiled.blocks[0]).__name__}


def prepare_rollouts(run: Run) -> None:
    """GRPO's rollout stage told where the run writes, how FLOPs count, and (beta > 0)
    what its reference is: the adapter switched off, or a frozen copy of the weights the
    run starts from."""
    rollouts, cfg = run.data.rollouts, run.cfg
    rollouts.run_dir, rollouts.flop_model = run.run_dir, run.flop_model
    if run.start.kind == "resume":
        # generations started before the checkpoint were sampled (and written) already
        rollouts.trim_samples(-(-run.state.step // cfg.objective.num_iterations))
    elif run.start.kind == "fresh" and run.acc.is_main_process:
        (run.run_dir / "rollouts.jsonl").unlink(missing_ok=True)
    mode = reference_mode(cfg, run.adapter)
    if mode == "adapter_off":
        rollouts.reference = run.adapter.disabled
    elif mode == "copy":
        fresh = run.adapter.name != "full" and cfg.train.init_from is None
        copy = FrozenCopy(run.acc.unwrap_model(run.model),
                          run.adapter.disabled if fresh else None)
        rollouts.reference_model, rollouts.reference = copy.model, copy.disabled


def held_out_count(data: TrainData) -> str:
    if data.rollouts is not None:
        return f"{len(data.rollouts.splits.eval)} held-out prompts"
    return f"{sum(len(s.examples) for s in data.eval_sets)} eval examples"


def plan_steps(cfg: Config, data: TrainData, state: TrainState, world: int,
               rebatched: bool = False) -> tuple[int, Schedule]:
    """The run's optimizer steps and LR schedule. A run annealing a checkpoint taken at
    step ``s0`` ends at ``s0 + decay_steps`` (or ``decay_ratio * s0``).

    A run of ``train.epochs`` continued with another global batch (``rebatched``: another
    number of processes or ``train.batch_size``) takes the data it has left in the steps
    of the new global batch: ``step + ceil((1 - step / planned_steps) * steps_now)``.
    """
    s = cfg.schedule
    if state.anneal_at is not None:
        steps = state.anneal_at + max(1, steps_or_ratio(s.decay_steps, s.decay_ratio,
                                                        state.anneal_at))
    else:
        steps = data.steps(cfg, world)
        if rebatched and cfg.train.max_steps is None and state.planned_steps:
            left = 1 - state.step / state.planned_steps
            steps = state.step + max(1, math.ceil(left * steps))
    return steps, Schedule.of(s, steps, state.anneal_at, state.anneal_start)


def choose_precision(cfg: Config, source: str, acc: Accelerator) -> Precision:
    """``train.precision`` resolved on the main process (its measurement decides for every
    process: ranks that chose differently would not match) and logged."""
    requested, launcher = cfg.train.precision, acc.mixed_precision  # accelerate launch's
    if launcher != "no" and requested in ("fp32", "bf16"):
        raise ConfigError(f"train.precision={requested} but accelerate launch set "
                          f"mixed_precision={launcher}: use train.precision=auto or bf16-mixed, "
                          "or launch with mixed_precision: no")
    chosen = [None]
    if acc.is_main_process:
        config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
        chosen[0] = choose("bf16-mixed" if launcher != "no" else requested, cfg.model.dtype,
                           config, acc.device)
        if launcher != "no":  # Accelerate's autocast wraps the forward: say so
            chosen[0] = replace(chosen[0], requested=requested,
                                reason=f"accelerate launch set mixed_precision={launcher}")
    if acc.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    precision = chosen[0]
    log.info("precision %s (train.precision=%s: %s); peak %.3g FLOP/s", precision.used,
             precision.requested, precision.reason, precision.peak_flops or 0)
    return precision


def check_model(cfg: Config, model: torch.nn.Module, first: Rows, tokenizer,
                adapter: Adapter, acc: Accelerator, precision: Precision
                ) -> tuple[Precision, dict[str, dict]]:
    """On the run's first examples (``first``, cut short): the precision the model trains
    in, and the loss's shortcuts (head at target positions, chunked loss) checked against
    the model's own loss (:mod:`leantune.train.loss_paths`); the chunked loss also needs to
    be asked for and an unsharded head."""
    chunked = ("train.chunked_loss=false" if not cfg.train.chunked_loss
               else "FSDP shards the head's weight"
               if acc.distributed_type == DistributedType.FSDP else True)
    examples = [e for row in first for e in row][:4]
    batch = {k: v.to(acc.device) for k, v in check_batch(
        examples, tokenizer.pad_token_id).items()}
    precision = check_trains(model, batch, precision, acc.device)
    with evaluating(model):
        return precision, check_loss_paths(model, batch, precision.compute_dtype, chunked)


def packed_layout(cfg: Config, adapter: Adapter) -> str:
    """The layout the data is built in: ``data.packing``, unless the adapter adds tokens
    to each row (prompt tuning), which packed examples would share."""
    return cfg.data.packing if adapter.packs else "none"


def decide_packing(cfg: Config, model: torch.nn.Module, data: TrainData, first: Rows,
                   pad_id: int, adapter: Adapter, acc: Accelerator, flop_model: FlopModel
                   ) -> dict:
    """``data.packing`` when the probe finds it exact on the run's own first micro-batch
    ``first`` and at full width (:mod:`leantune.packing.probe`), else padding (the data is
    switched to it); the decision is ``summary.json``'s ``packing``."""
    requested = cfg.data.packing
    packs = packed_layout(cfg, adapter) != "none"
    batches = probe_batches(first, cfg.data.max_length) if packs else []
    packing = resolve_packing(requested, model, adapter, batches, pad_id, cfg.data.max_length,
                              acc=acc, flop_model=flop_model)
    if packs and packing["used"] == "none":
        data.use_padding()
    if data.rollouts is not None:
        packing["rollouts"] = data.rollouts.check_layout(model, packing["used"] != "none")
    if isinstance(data.batcher, PairBatcher):
        data.batcher, packing["pairs"] = check_pair_layout(model, data.batcher,
                                                           data.batcher.pairs)
    return packing


def build_tasks(cfg: Config, tokenizer, packing: dict, adapter: Adapter, acc: Accelerator,
                flop_model: FlopModel) -> tuple[dict[str, list[ChoiceDoc]], ChoiceScorer | None]:
    """``eval.tasks``' documents (``eval.task_examples`` of each validation split) and the
    scorer that lays them out like the held-out sets (packed when exact)."""
    if cfg.eval.tasks is None:
        return {}, None
    docs = {name: subset(name, cfg.eval.task_examples) for name in task_names(cfg.eval.tasks)}
    return docs, ChoiceScorer(tokenizer, cfg.data.max_length, cfg.eval.batch_size,
                              eval_mode(packing), acc, flop_model,
                              share_context=adapter.virtual_tokens == 0)


def eval_mode(packing: dict) -> str:
    """Held-out sets are packed whenever packing is exact here (same loss, less waste)."""
    return "online" if packing["exact"] and packing["requested"] != "none" else "none"


def build_fast_forward(cfg: Config, model: torch.nn.Module, data: TrainData, packing: dict,
                       flop_model: FlopModel, acc: Accelerator,
                       objective: Objective = NEXT_TOKEN) -> FastForward | None:
    """The Fast Forward stage over every trainable tensor, judged on the FF set's two
    halves (both must improve)."""
    if not cfg.fast_forward.enabled:
        return None
    mode = eval_mode(packing)

    def measure(examples: list) -> dict:
        tally = evaluate(model, examples, cfg.eval.batch_size,
                         lambda b: data.batcher.collate_examples(b, mode), acc, objective)
        reshard(model)  # FF's next write must reach the weights the next forward gathers
        return tally

    reshard(model)  # the parameters FF moves are the sharded ones the optimizer steps
    return FastForward(cfg.fast_forward, [p for p in model.parameters() if p.requires_grad],
                       halves_loss(split_halves(data.ff), measure, objective,
                                   lambda tally: all_means(tally, acc)),
                       flop_model.forward_examples(data.ff))
