"""Load what training produced: a run directory (its base model plus ``adapter/``, or the
``model/`` of full fine-tuning) or a plain model directory / hub id, for generation,
evaluation and export.
"""

from __future__ import annotations

from pathlib import Path

from leantune.adapters import build_adapter, load_base
from leantune.config import ModelConfig, load_config
from leantune.model.load import load_model, load_tokenizer, resolve_local


def load_for_generation(target: Path, for_merge: bool = False):
    """``(model, tokenizer)`` from a run directory (its base model + ``adapter/``, or the
    trained ``model/`` of full fine-tuning) or from a model directory / hub id.

    ``for_merge`` loads the base as the adapter's merge needs it (QLoRA: dequantized).
    """
    model, tokenizer, _, _ = load_target(target, for_merge)
    return model, tokenizer


def load_target(target: Path, for_merge: bool = False):
    """``(model, tokenizer, cfg, adapter)``: as :func:`load_for_generation`, with the run's
    config and adapter (both None for a model directory / hub id)."""
    if (target / "config.yaml").is_file():
        cfg = load_config(target / "config.yaml")
        adapter = build_adapter(cfg.adapter)
        saved = target / adapter.output_name
        if not saved.is_dir():
            raise FileNotFoundError(f"{target} has no {adapter.output_name}/ yet (the run has "
                                    f"not finished); checkpoints are under {target}/checkpoints/")
        source = resolve_local(cfg.model)
        base = load_base(cfg.model, adapter, source)
        if for_merge:
            base = adapter.merge_base(base)
        return adapter.load(base, saved), load_tokenizer(cfg.model, source), cfg, adapter
    cfg = ModelConfig(name_or_path=str(target))
    source = resolve_local(cfg)
    return load_model(cfg, source), load_tokenizer(cfg, source), None, None
