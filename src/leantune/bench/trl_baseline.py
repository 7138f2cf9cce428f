"""The peer to beat: TRL's ``SFTTrainer`` with ``packing=True, packing_strategy="bfd"`` on
the same base model, LoRA, token ids, batch size and max length as leantune's modes.

TRL packs the dataset ahead of time (best-fit-decreasing into ``max_length`` rows) and
feeds each batch padding-free, flattened into one row with position_ids. Its
``train_runtime`` covers the training loop only (tokenization and packing happen when
the trainer is built), which is what leantune's timing covers too.
"""

from __future__ import annotations

import tempfile

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from leantune.data.encode import Encoded
from leantune.eval.loss import evaluate
from leantune.packing.batching import pack_batch
from leantune.packing.collate import collate_packed
from leantune.train.metrics import PeakMemory


def run_trl(source: str, tokenizer, train: list[Encoded], held_out: list[Encoded],
            batch_size: int, max_length: int, lr: float, acc: Accelerator,
            micro_tokens: int = 4096) -> dict:
    """Train TRL's packed LoRA SFT; ``batch_size`` rows per optimizer step, as gradient
    accumulation over micro-batches of ``micro_tokens // max_length`` rows (leantune's
    offline mode splits its steps the same way)."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    per_device = max(1, min(batch_size, micro_tokens // max_length))
    dataset = Dataset.from_list([{"input_ids": e.input_ids} for e in train])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=per_device, num_train_epochs=1,
            gradient_accumulation_steps=max(1, batch_size // per_device),
            learning_rate=lr, lr_scheduler_type="constant", packing=True,
            packing_strategy="bfd", max_length=max_length, report_to=[], save_strategy="no",
            logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=False,
            dataloader_num_workers=0, max_grad_norm=1.0, warmup_steps=0, seed=0,
        )
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft)
        with PeakMemory() as memory:
            out = trainer.train()
        seconds = out.metrics["train_runtime"]
        rows = trainer.train_dataset
        real = sum(len(ids) for ids in rows["input_ids"])
        positions = real  # padding-free: one flattened row per batch, no pad tokens
        peft_model = trainer.model
    # The same packed, exact eval as leantune's modes, on TRL's trained adapter.
    pad_id = tokenizer.pad_token_id
    eval_loss = evaluate(peft_model, held_out, 8, lambda b: collate_packed(
        b, pack_batch([len(e.input_ids) for e in b], max_length), pad_id), acc)["loss"]
    targets = real - len(train)  # every token but each example's first is a target
    return {"mode": "trl", "seconds": seconds, "tokens_per_second": real / seconds,
            "target_tokens_per_second": targets / seconds,
            "padding_fraction": 1 - real / positions, "rows": len(rows),
            "optimizer_steps": out.global_step, "peak_memory_delta_bytes": memory.delta,
            "eval_loss": eval_loss}
