"""Load a trained run (base + adapter) or a plain model for generation, and answer
prompts given as text or chat messages.
"""

from __future__ import annotations

from pathlib import Path

from leantune.adapters import build_adapter, load_base
from leantune.config import ConfigError, ModelConfig, load_config
from leantune.generate import generate
from leantune.model import load_model, load_tokenizer, resolve_local


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


def render_prompt(row: dict, tokenizer, raw: bool = False) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` for a ``{"prompt": ...}`` or ``{"messages": [...]}`` row."""
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                             add_generation_prompt=True), False
    if not isinstance(row.get("prompt"), str):
        raise ConfigError(f"a prompt row needs a 'prompt' string or 'messages'; got {row!r}")
    if raw or tokenizer.chat_template is None:
        return row["prompt"], True
    messages = [{"role": "user", "content": row["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def answer_prompts(model, tokenizer, rows: list[dict], max_new_tokens: int,
                   temperature: float = 0.0, raw: bool = False) -> list[str]:
    """Replies to every row, batched by how the prompt is tokenized."""
    rendered = [render_prompt(r, tokenizer, raw) for r in rows]
    return generate_rendered(model, tokenizer, rendered, max_new_tokens, temperature=temperature)


def generate_rendered(model, tokenizer, rendered: list[tuple[str, bool]], max_new_tokens: int,
                      batch_size: int = 8, temperature: float = 0.0) -> list[str]:
    """Replies to ``(text, add_special_tokens)`` prompts, in their order; prompts are
    batched with others tokenized the same way."""
    replies = [""] * len(rendered)
    for special in (False, True):
        idx = [i for i, (_, s) in enumerate(rendered) if s == special]
        if idx:
            out = generate(model, tokenizer, [rendered[i][0] for i in idx], max_new_tokens,
                           special, batch_size, temperature)
            for i, reply in zip(idx, out, strict=True):
                replies[i] = reply
    return replies
