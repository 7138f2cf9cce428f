"""``leantune export RUN_DIR --out DIR``: merge a run's adapter into its base model and
write a standalone Hugging Face model directory (config, safetensors weights, tokenizer
with its chat template) that ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT.

For LoRA (and DoRA) merging folds ``(alpha / r) B A`` (and DoRA's magnitude) into the
base weights, so the merged model's logits equal base + adapter up to float rounding.
The directory is written next to ``--out`` under a temporary name and renamed when
complete, so an interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class ExportError(ValueError):
    """The run cannot be exported as asked (say why in the message)."""


def export_run(run_dir: Path, out: Path) -> dict:
    """Merge ``run_dir/adapter`` into the run's base model and save it to ``out``.

    Returns:
        ``{"out", "parameters"}`` of the written model.

    Raises:
        FileNotFoundError: ``run_dir`` is not a finished run.
        ExportError: ``out`` exists and is not empty, or the run has no mergeable adapter.
    """
    from peft import PeftModel  # the CLI imports this module for ExportError: keep it light

    from leantune.serve import load_for_generation

    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a leantune run directory (no config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --out")
    model, tokenizer = load_for_generation(run_dir)
    if not isinstance(model, PeftModel):
        raise ExportError(f"{run_dir} holds no PEFT adapter to merge")
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turned the KV cache off; generation wants it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model is an ordinary directory
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "parameters": sum(p.numel() for p in merged.parameters())}
