"""One arm of ``leantune bench preference``, run in a fresh interpreter (so its peak
resident memory is its own): ``python -m leantune.bench.preference_arms SPEC OUT``.

Arms:

- ``trl``: TRL's ``DPOTrainer`` (sigmoid loss, LoRA through ``peft_config``, padded rows,
  the reference as the adapter switched off), the pairs in the order given, sequentially.
- ``leantune``: ``leantune train`` in-process with ``objective.*`` and the layout asked.
- ``score``: a trained run or a base model scored on multiple-choice tasks and held-out
  pairs (the raw log-prob margin, comparable between a base model and every objective).

Every arm reports ``ru_maxrss`` (one meter for all) and its per-step losses.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def trl_start(spec: dict) -> tuple:
    """``(tokenizer, model, rows, peft_config)`` for a TRL arm: the spec's model in fp32
    with sdpa, its rows in the order given, LoRA as :data:`LORA`."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.config import ModelConfig
    from leantune.model.load import resolve_local

    source = resolve_local(ModelConfig(name_or_path=spec["model"]))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    rows = [json.loads(line) for line in open(spec["ordered_file"])]
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return tokenizer, model, rows, peft


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, model, rows, peft = trl_start(spec)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", max_length=spec["max_length"], beta=0.1,
            loss_type=["sigmoid"], train_sampling_strategy="sequential", report_to=[],
            use_cpu=not torch.cuda.is_available(), bf16=False, seed=spec["seed"],
            dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft)
        out = trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"seconds": out.metrics["train_runtime"], "losses": [h["loss"] for h in steps],
            "margins": [h.get("rewards/margins") for h in steps],
            "peak_memory_bytes": peak_rss(), "optimizer_steps": out.global_step}


def leantune_overrides(spec: dict, out_dir: Path) -> list[str]:
    lora = spec.get("adapter", "lora")
    over = [f"model.name_or_path={spec['model']}", f"data.path={spec['data']}",
            f"train.output_dir={out_dir}", f"objective.kind={spec['objective']}",
            f"train.batch_size={spec['batch_size']}", f"train.max_steps={spec['steps']}",
            f"optim.lr={spec['lr']}", f"data.max_length={spec['max_length']}",
            f"train.seed={spec['seed']}", f"adapter.method={lora}", "train.progress=false",
            "eval.generate=0", f"train.precision={spec.get('precision', 'fp32')}"]
    if lora == "lora":
        over += [f"adapter.{k}={v}" for k, v in LORA.items()]
    else:
        over += ["adapter.dropout=0.0"]
    return over + list(spec.get("extra", []))


def run_leantune(spec: dict) -> dict:
    import leantune.train.loop as loop
    from leantune.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(spec.get("run_dir") or Path(tmp) / "run")
        summary = loop.train(load_config(None, leantune_overrides(spec, run_dir)))
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r and "tag" not in r]
    evals = [r for r in rows if r.get("tag") in ("before", "periodic", "after")]
    return {"seconds": summary["train_seconds"], "losses": [r["loss"] for r in steps],
            "margins": [r.get("rewards/margins") for r in steps],
            "peak_memory_bytes": peak_rss(), "optimizer_steps": summary["optimizer_steps"],
            "layout": (summary["objective"].get("layout") or {}).get("layout"),
            "reference_share": summary["objective"].get("reference_share"),
            "train_flops": summary["train_flops"], "ff_flops": summary["ff_flops"],
            "ff_steps_accepted": summary["ff_steps_accepted"],
            "ff_stopped": [r["ff_stopped"] for r in rows if r.get("tag") == "fast_forward"],
            "evals": [{"step": r["step"], "loss": r["eval_loss"], "flops": r["flops"],
                       "compute_seconds": r["compute_seconds"]} for r in evals]}


def run_score(spec: dict) -> dict:
    """Train (unless ``objective`` is ``base``), then score the run or the base model."""
    from leantune.config import ModelConfig
    from leantune.eval.sets import evaluate_target
    from leantune.model.load import resolve_local

    with tempfile.TemporaryDirectory() as tmp:
        trained = None
        if spec["objective"] == "base":
            target = Path(resolve_local(ModelConfig(name_or_path=spec["model"])))
        else:
            target = Path(tmp) / "run"
            trained = run_leantune(spec | {"run_dir": str(target)})
        result = evaluate_target(target, [spec["held_out"]], tasks=spec["tasks"],
                                 limit=spec["task_examples"], batch_size=16,
                                 overrides={"max_length": spec["max_length"]},
                                 relative_pairs=False)
    pairs = next(iter(result["pairs"].values()))
    return {"tasks": {name: {"acc": r["acc"], "acc_ci": r["acc_ci"], "docs": r["docs"]}
                      for name, r in result["choices"].items()},
            "macro": result["macro"], "pair_accuracy": pairs["accuracy"],
            "pair_accuracy_ci": pairs["accuracy_ci"], "pair_margin": pairs["margin"],
            "pairs": pairs["pairs"], "train": trained}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run = {"trl": run_trl, "leantune": run_leantune, "score": run_score}[spec["impl"]]
    Path(out_path).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
