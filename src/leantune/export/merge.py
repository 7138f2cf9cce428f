"""``leantune export RUN_DIR --out DIR``: merge a run's adapter into its base model and
write a standalone Hugging Face model directory (config, safetensors weights, tokenizer
with its chat template) that ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT.

- LoRA/DoRA fold ``(alpha / r) B A`` (and DoRA's magnitude) into the base weights, IA3
  multiplies its scales into them: logits equal base + adapter up to float rounding.
- QLoRA: the 4-bit base is dequantized first and the adapter merged into that (merging
  into 4-bit weights would requantize them and change outputs, peft#2321); the result
  reproduces the trained 4-bit model + adapter, and the export says so.
- Full fine-tuning: the trained model is written as is.
- Prompt tuning has no weight to fold its virtual tokens into, and ReFT's edits depend
  on the position: the export refuses and says how to use the adapter instead.

The directory is written next to ``--out`` under a temporary name and renamed when
complete, so an interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

from pathlib import Path

from leantune.common.files import atomic_dir


class ExportError(ValueError):
    """The run cannot be exported as asked (say why in the message)."""


def export_run(run_dir: Path, out: Path) -> dict:
    """Merge the run's adapter into its base model and save the result to ``out``.

    Returns:
        ``{"out", "parameters", "method", "note"}``; ``note`` says how the merge differs
        from a plain fold (QLoRA), else None.

    Raises:
        FileNotFoundError: ``run_dir`` is not a finished run.
        ExportError: ``out`` exists and is not empty, or the method cannot be merged.
    """
    # The CLI imports this module for ExportError: keep the heavy imports here.
    from leantune.adapters import NotMergeable, build_adapter
    from leantune.adapters.loading import load_for_generation
    from leantune.config import load_config

    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a leantune run directory (no config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --out")
    adapter = build_adapter(load_config(run_dir / "config.yaml").adapter)
    model, tokenizer = load_for_generation(run_dir, for_merge=True)
    try:
        merged = adapter.merge(model)
    except NotMergeable as e:
        raise ExportError(str(e)) from None
    merged.config.use_cache = True  # training turned the KV cache off; generation wants it
    _write_atomically(out, lambda d: (merged.save_pretrained(d, safe_serialization=True),
                                      tokenizer.save_pretrained(d)))
    return {"out": str(out), "parameters": sum(p.numel() for p in merged.parameters()),
            "method": adapter.name, "note": adapter.merge_note}


def _write_atomically(out: Path, write) -> None:
    """Call ``write(tmp)`` on a fresh directory beside ``out`` (an empty ``out``, checked by
    the caller, is replaced), then rename it to ``out``."""
    with atomic_dir(out) as tmp:
        write(tmp)
