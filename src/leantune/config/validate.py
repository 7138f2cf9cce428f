"""Cross-field and range checks of a loaded :class:`~leantune.config.Config` that types
alone cannot express; each failure names the key and what is allowed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leantune.config.parsing import ConfigError
from leantune.config.tasks import task_names

if TYPE_CHECKING:
    from leantune.config.schema import AdapterConfig, Config, ScheduleConfig

TARGET_PRESETS = ("auto", "all-linear", "attention", "mlp")

def validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    positive = {
        "data.max_length": cfg.data.max_length,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "eval.batch_size": cfg.eval.batch_size,
        "adapter.r": cfg.adapter.r,
        "adapter.num_virtual_tokens": cfg.adapter.num_virtual_tokens,
        "checkpoint.keep_last_n": cfg.checkpoint.keep_last_n,
        "train.log_every": cfg.train.log_every,
        "fast_forward.interval": cfg.fast_forward.interval,
        "fast_forward.max_steps_per_stage": cfg.fast_forward.max_steps_per_stage,
        "data.eval_tokens": cfg.data.eval_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    optional = {"eval.every": cfg.eval.every, "checkpoint.every": cfg.checkpoint.every,
                "train.max_steps": cfg.train.max_steps, "data.max_examples": cfg.data.max_examples,
                "fast_forward.eval_examples": cfg.fast_forward.eval_examples}
    for key, maybe in optional.items():
        if maybe is not None and maybe < 1:
            raise ConfigError(f"{key}: must be >= 1 or null, got {maybe}")
    if cfg.fast_forward.max_cost is not None and not cfg.fast_forward.max_cost > 0:
        raise ConfigError("fast_forward.max_cost: must be > 0 or null, got "
                          f"{cfg.fast_forward.max_cost}")
    # A negative cap would slice from the end in build_splits and move rows silently.
    if cfg.data.eval_examples is not None and cfg.data.eval_examples < 0:
        raise ConfigError(f"data.eval_examples: must be >= 0 or null, got {cfg.data.eval_examples}")
    if cfg.data.batching == "token_budget":
        if cfg.data.token_budget is None or cfg.data.token_budget < cfg.data.max_length:
            raise ConfigError(f"data.token_budget: batching=token_budget needs a budget >= "
                              f"data.max_length ({cfg.data.max_length}), got {cfg.data.token_budget}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {cfg.data.eval_fraction}")
    _validate_schedule(cfg.schedule)
    _validate_continual(cfg)
    non_negative = {"fast_forward.burn_in": cfg.fast_forward.burn_in,
                    "fast_forward.min_improvement": cfg.fast_forward.min_improvement}
    for key, number in non_negative.items():
        if number < 0:
            raise ConfigError(f"{key}: must be >= 0, got {number}")
    _validate_adapter(cfg.adapter)
    if cfg.eval.tasks is not None:
        try:
            task_names(cfg.eval.tasks)
        except ValueError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
    if cfg.eval.task_examples is not None and cfg.eval.task_examples < 1:
        raise ConfigError(f"eval.task_examples: must be >= 1 or null, got {cfg.eval.task_examples}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0 (or null for the method's usual LR), got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    if cfg.train.epochs <= 0 and cfg.train.max_steps is None:
        raise ConfigError("train.epochs: must be > 0 when train.max_steps is null")
    _validate_precision(cfg)
    _validate_objective(cfg)


def _validate_objective(cfg: Config) -> None:
    """The objective's knobs, and what a preference objective can train on."""
    o = cfg.objective
    if o.beta is not None and not o.beta > 0 and o.kind != "grpo":
        raise ConfigError(f"objective.beta: must be > 0 or null, got {o.beta}")
    for key in ("gamma", "nll"):
        if getattr(o, key) < 0:
            raise ConfigError(f"objective.{key}: must be >= 0, got {getattr(o, key)}")
    for key in ("desirable_weight", "undesirable_weight"):
        if not getattr(o, key) > 0:
            raise ConfigError(f"objective.{key}: must be > 0, got {getattr(o, key)}")
    if o.kind == "sft":
        return
    if o.kind == "grpo":
        _validate_grpo(cfg)
        return
    if o.reference != "auto" and o.kind in ("simpo", "orpo"):
        raise ConfigError(f"objective.reference: {o.kind} has no reference model; leave it "
                          f"auto (got {o.reference})")
    if o.reference == "adapter_off" and cfg.adapter.method == "full":
        raise ConfigError("objective.reference: adapter_off needs an adapter, and "
                          "adapter.method is full; use copy or cached (or auto)")
    if cfg.data.mode == "corpus":
        raise ConfigError(f"data.mode: objective.kind={o.kind} trains on preference rows; "
                          "corpus mode is raw text (use data.mode=examples)")
    if cfg.data.packing in ("offline", "naive"):
        raise ConfigError(f"data.packing: {cfg.data.packing!r} with objective.kind={o.kind}; a "
                          "preference batch keeps each pair (or KTO's batch) whole: use online "
                          "or none")


def _validate_grpo(cfg: Config) -> None:
    """GRPO's knobs, and what it cannot be combined with."""
    o = cfg.objective
    if o.beta is not None and o.beta < 0:
        raise ConfigError(f"objective.beta: must be >= 0 or null, got {o.beta}")
    positive = {"num_generations": o.num_generations - 1, "max_completion_length":
                o.max_completion_length, "num_iterations": o.num_iterations,
                "temperature": o.temperature, "epsilon": o.epsilon,
                "epsilon_high": 1 if o.epsilon_high is None else o.epsilon_high}
    for key, value in positive.items():
        if not value > 0:
            want = ">= 2 (a group needs two completions to compare)" if key == (
                "num_generations") else "> 0"
            raise ConfigError(f"objective.{key}: must be {want}, got {getattr(o, key)}")
    if not 0 < o.top_p <= 1:
        raise ConfigError(f"objective.top_p: must be in (0, 1], got {o.top_p}")
    if not o.rewards:
        raise ConfigError("objective.rewards: grpo needs at least one reward function "
                          "(built-in: exact_match, numeric_match, format; or file.py:function)")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.rewards):
        raise ConfigError(f"objective.reward_weights: {len(o.reward_weights)} weights for "
                          f"{len(o.rewards)} reward functions ({o.rewards})")
    if o.reference not in ("auto", "adapter_off", "copy"):
        raise ConfigError(f"objective.reference: grpo samples new completions every step, so "
                          f"their reference log-probs cannot be cached; use auto, adapter_off "
                          f"or copy (got {o.reference})")
    if o.reference == "adapter_off" and cfg.adapter.method == "full":
        raise ConfigError("objective.reference: adapter_off needs an adapter, and "
                          "adapter.method is full; use copy (or auto)")
    if cfg.fast_forward.enabled:
        raise ConfigError("fast_forward.enabled: not with objective.kind=grpo. Fast Forward "
                          "judges each repeated update on a fixed held-out set, and a GRPO "
                          "loss has none: its batches are fresh samples of the policy, and "
                          "a fixed set of old rollouts scores an update by how it changes "
                          "their likelihood, not by the reward it earns")
    if cfg.data.mode == "corpus":
        raise ConfigError("data.mode: objective.kind=grpo trains on prompt rows; corpus mode "
                          "is raw text (use data.mode=examples)")
    if cfg.data.packing in ("offline", "naive"):
        raise ConfigError(f"data.packing: {cfg.data.packing!r} with objective.kind=grpo; "
                          "rollouts are packed as they are sampled: use online or none")
    if cfg.data.batching == "token_budget":
        raise ConfigError("data.batching: token_budget with objective.kind=grpo; a GRPO step "
                          "takes train.batch_size prompts (random or length_grouped)")


def _validate_precision(cfg: Config) -> None:
    """fp32 compute needs fp32 weights, and bf16 means bf16 weights."""
    precision, dtype = cfg.train.precision, cfg.model.dtype
    if precision == "fp32" and dtype in ("bfloat16", "float16"):
        raise ConfigError(f"train.precision=fp32 with model.dtype={dtype}: fp32 compute needs "
                          "float32 weights; use model.dtype=auto or float32, or "
                          "train.precision=bf16-mixed (frozen base in bf16, trainable fp32)")
    if precision == "bf16" and dtype in ("float32", "float16"):
        raise ConfigError(f"train.precision=bf16 with model.dtype={dtype}: bf16 holds every "
                          "weight in bfloat16; use model.dtype=auto or bfloat16")


def _validate_schedule(s: ScheduleConfig) -> None:
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise ConfigError(f"schedule.warmup_ratio: must be in [0, 1), got {s.warmup_ratio}")
    for key in ("min_lr_ratio", "decay_ratio", "const_lr_ratio", "cooldown_ratio"):
        value = getattr(s, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"schedule.{key}: must be in [0, 1], got {value}")
    for key in ("warmup_steps", "decay_steps", "cooldown_steps"):
        if getattr(s, key) < 0:
            raise ConfigError(f"schedule.{key}: must be >= 0, got {getattr(s, key)}")
    if s.anneal_from is not None and s.decay_steps == 0 and s.decay_ratio == 0:
        raise ConfigError("schedule.decay_steps: anneal_from needs the anneal's length: "
                          "decay_steps > 0 (or decay_ratio > 0, of the checkpoint's steps)")
    if s.kind == "infinite" and s.warmup_ratio + s.cooldown_ratio + s.decay_ratio > 1.0:
        raise ConfigError("schedule.cooldown_ratio: warmup_ratio + cooldown_ratio + decay_ratio "
                          f"must not exceed 1 for kind=infinite, got {s.warmup_ratio} + "
                          f"{s.cooldown_ratio} + {s.decay_ratio}")


def _validate_continual(cfg: Config) -> None:
    """Corpus mode, replay, and where a run starts from."""
    r = cfg.data.replay
    if r.path is not None and cfg.data.mode != "corpus":
        raise ConfigError("data.replay.path: replay mixes raw-text windows; set data.mode=corpus")
    for key, value in {"ratio": r.ratio, "final_ratio": r.final_ratio}.items():
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"data.replay.{key}: must be in [0, 1), got {value}")
    if (r.ratio > 0 or (r.final_ratio or 0) > 0) and r.path is None:
        raise ConfigError("data.replay.path: a replay ratio above 0 needs the corpus to replay")
    if cfg.train.init_from is not None and cfg.schedule.anneal_from is not None:
        raise ConfigError("train.init_from: give either train.init_from (a new run from those "
                          "weights) or schedule.anneal_from (anneal that run), not both")
    if cfg.data.mode == "corpus" and cfg.data.packing == "offline":
        raise ConfigError("data.packing: 'offline' packs examples ahead of time; corpus windows "
                          "are full already: use online, none or naive")


def parse_positions(text: str) -> tuple[int, int]:
    """ReFT's ``adapter.positions``: ``"f7+l7"`` -> (7, 7); ``"f5"`` -> (5, 0); ``"l3"`` ->
    (0, 3).

    Raises:
        ConfigError: anything else (a repeated part included).
    """
    parts = text.split("+")
    if not all(len(p) > 1 and p[0] in "fl" and p[1:].isdigit() for p in parts) or len(
            {p[0] for p in parts}) != len(parts):
        raise ConfigError(f"adapter.positions: {text!r} is not like 'f7+l7', 'f5' or 'l3'")
    counts = {p[0]: int(p[1:]) for p in parts}
    return counts.get("f", 0), counts.get("l", 0)


def _validate_adapter(a: AdapterConfig) -> None:
    if isinstance(a.target_modules, str) and a.target_modules not in TARGET_PRESETS:
        raise ConfigError(f"adapter.target_modules: {a.target_modules!r} is not a preset; choose "
                          f"one of {list(TARGET_PRESETS)} or give a list of module names")
    if isinstance(a.target_modules, list) and not a.target_modules:
        raise ConfigError("adapter.target_modules: the list is empty")
    if a.prompt_init == "text" and not a.prompt_init_text:
        raise ConfigError("adapter.prompt_init_text: prompt_init=text needs a non-empty text")
    if isinstance(a.layers, str) and a.layers != "all":
        raise ConfigError(f"adapter.layers: {a.layers!r}; give a list of layer indices or 'all'")
    if isinstance(a.layers, list) and (not a.layers or min(a.layers) < 0):
        raise ConfigError(f"adapter.layers: {a.layers}; need at least one index, all >= 0")
    parse_positions(a.positions)
    if a.use_dora and a.method not in ("lora", "qlora"):
        raise ConfigError(f"adapter.use_dora: DoRA is a LoRA variant; adapter.method is {a.method!r}")
