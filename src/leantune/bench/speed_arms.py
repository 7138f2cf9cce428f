"""One arm of ``leantune bench speed``, run in its own process so that its peak resident
memory is its own: ``python -m leantune.bench.speed_arms SPEC.json OUT.json``.

An arm is ``{"impl", "method", "layout", "precision", "chunked"}``, and optionally
``base_dtype`` (``model.dtype``) and ``gradient_checkpointing``:

- ``leantune``: leantune's optimizer step (:func:`~leantune.train.step.train_step`) on
  its batches (``layout`` online packing or ``none``: padding), in ``precision`` as
  ``leantune train`` sets it up (fp32 master weights and autocast forwards for
  bf16-mixed; ``auto`` measures and decides), the chunked loss on or off.
- ``bare``: the loop every tutorial shows: PEFT's ``get_peft_model`` (or the whole model),
  right-padded batches, ``model(..., labels=...).loss``, AdamW; bf16-mixed through
  ``torch.autocast``.
- ``trl``: TRL's ``SFTTrainer``, padded or ``padding_free`` (``layout``), fp32.

Every arm trains the same examples, 8 per optimizer step by default (no accumulation),
from the same LoRA initialization seed, at the same LR, and is then evaluated by the same
exact held-out loss (:func:`leantune.eval.loss.evaluate`, in the arm's precision).
FLOPs are the ledger's for the *examples* (:class:`~leantune.model.flops.FlopModel`: each
example alone, the head at its targets), the same useful work for every arm whatever its
padding, so MFU = those FLOPs / seconds / the peak in the arm's compute dtype.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.bench.common import sharegpt_exchanges
from leantune.bench.packing import run_mode
from leantune.config import AdapterConfig, ModelConfig
from leantune.data.encode import IGNORE, Encoded
from leantune.eval.loss import evaluate
from leantune.model.chunked_loss import turn_off
from leantune.model.compile import CompiledBlocks
from leantune.model.flops import FlopModel
from leantune.model.load import load_model, load_tokenizer, resolve_local
from leantune.model.precision import autocast_forward, choose
from leantune.train.metrics import PeakMemory

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}  # PEFT's all-linear targets, as leantune's


def setup(spec: dict):
    """Model source, tokenizer, and the (train, held-out) examples every arm shares: single
    ShareGPT exchanges, or ``spec["examples_file"]`` (JSON ``[[input_ids, labels], ...]``)."""
    model_cfg = ModelConfig(name_or_path=spec["model"])
    source = resolve_local(model_cfg)
    tokenizer = load_tokenizer(model_cfg, source)
    if spec.get("examples_file"):
        with open(spec["examples_file"]) as f:
            data = [Encoded(ids, labels) for ids, labels in json.load(f)]
    else:
        data = sharegpt_exchanges(tokenizer, spec["examples"] + spec["eval_examples"],
                                  spec["max_length"])
    return source, tokenizer, data[:spec["examples"]], data[spec["examples"]:]


def useful_flops(model: torch.nn.Module, train: list[Encoded]) -> int:
    """Training FLOPs of the examples themselves (each alone, the head at its targets)."""
    flop_model = FlopModel.of(model)
    return sum(flop_model.train(1, len(e.input_ids), e.num_targets) for e in train)


def leantune_arm(spec: dict, source: str, tokenizer, train, held_out, acc) -> dict:
    config = AutoConfig.from_pretrained(source)
    precision = choose(spec["precision"], "auto", config, acc.device)
    full = spec["method"] == "full"
    dtype = precision.weight_dtype(spec.get("base_dtype", "auto"), trains_base=full,
                                   cuda=acc.device.type == "cuda")
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(method="full") if full else AdapterConfig(**LORA))
    model_cfg = ModelConfig(name_or_path=source, dtype=dtype,
                            gradient_checkpointing=spec.get("gradient_checkpointing", False))
    model = adapter.apply(load_model(model_cfg, source))
    precision.prepare(model, acc.device.type, frozen_half=spec.get("base_dtype", "auto") == "auto")
    if not spec["chunked"]:
        turn_off(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = run_mode(model, init, spec["layout"], train, held_out, spec["batch_size"],
                      spec["max_length"], tokenizer.pad_token_id, spec["lr"], acc,
                      micro_tokens=spec["batch_size"] * spec["max_length"],
                      compiled=CompiledBlocks(model) if spec.get("compile") else None)
    return result | {"precision_used": precision.used, "precision_ratio": precision.ratio,
                     "peak_flops": precision.peak_flops, "flops": useful_flops(model, train)}


def _padded(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """The bare loop's own right-padding (not leantune's collate), so that the parity test
    between it and leantune's padded step compares two independent layouts."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = (torch.tensor(e.input_ids),
                                                  torch.tensor(e.labels), 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _hf_model(source: str, method: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if method == "full":
        return model
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                            lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def bare_arm(spec: dict, source: str, tokenizer, train, held_out, acc) -> dict:
    model = _hf_model(source, spec["method"])
    mixed = spec["precision"] == "bf16-mixed"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    size, seconds, real = spec["batch_size"], 0.0, 0
    model.train()
    with PeakMemory() as memory:
        for i in range(0, len(train), size):
            tick = time.perf_counter()
            batch = _padded(train[i:i + size], tokenizer.pad_token_id)
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=mixed):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - tick
            real += int(batch["attention_mask"].sum())
    if mixed:
        autocast_forward(model, torch.bfloat16, acc.device.type)  # eval as it trained
    eval_loss = evaluate(model, held_out, 8, lambda b: _padded(b, tokenizer.pad_token_id),
                         acc)["loss"]
    return {"seconds": seconds, "tokens_per_second": real / seconds,
            "peak_memory_delta_bytes": memory.delta, "eval_loss": eval_loss,
            "optimizer_steps": -(-len(train) // size), "flops": useful_flops(model, train)}


def trl_arm(spec: dict, source: str, tokenizer, train, held_out, acc) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _hf_model(source, spec["method"])
    free = spec["layout"] == "padding_free"
    dataset = Dataset.from_list([{"input_ids": e.input_ids} for e in train])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
            learning_rate=spec["lr"], lr_scheduler_type="constant", packing=False,
            # padding-free without packing refuses a max_length: the examples are cut already
            padding_free=free, max_length=None if free else spec["max_length"],
            report_to=[], save_strategy="no", logging_steps=1,
            bf16=spec["precision"] == "bf16-mixed",
            use_cpu=acc.device.type == "cpu", dataloader_num_workers=0, max_grad_norm=1.0,
            warmup_steps=0, seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
        with PeakMemory() as memory:
            out = trainer.train()
    seconds = out.metrics["train_runtime"]
    real = sum(len(e.input_ids) for e in train)
    if spec["precision"] == "bf16-mixed":
        autocast_forward(trainer.model, torch.bfloat16, acc.device.type)  # eval as it trained
    eval_loss = evaluate(trainer.model, held_out, 8,
                         lambda b: _padded(b, tokenizer.pad_token_id), acc)["loss"]
    return {"seconds": seconds, "tokens_per_second": real / seconds,
            "peak_memory_delta_bytes": memory.delta, "eval_loss": eval_loss,
            "optimizer_steps": out.global_step, "flops": useful_flops(trainer.model, train)}


ARMS = {"leantune": leantune_arm, "bare": bare_arm, "trl": trl_arm}


def run_arm(spec: dict) -> dict:
    """Set up and run one arm; its figures and the process's peak resident memory."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    source, tokenizer, train, held_out = setup(spec)
    result = ARMS[spec["impl"]](spec, source, tokenizer, train, held_out, acc)
    # ru_maxrss is in KiB on Linux: the whole process, model load included.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    return spec | result | {"peak_memory_bytes": peak}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        arm = json.load(f)
    with open(out_path, "w") as f:
        json.dump(run_arm(arm), f)
