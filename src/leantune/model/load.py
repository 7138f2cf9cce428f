"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

GGUF checkpoints are dequantized by transformers (slow: it runs in Python), so
the result is cached once as a plain HF directory and reloaded from there (< 1 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from leantune.common.files import atomic_dir
from leantune.config import ModelConfig
from leantune.model.rounding import tolerance_for

log = logging.getLogger(__name__)

class ModelError(ValueError):
    """The model cannot be loaded as configured; the message says what to change."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is float32 on CPU and bf16 on GPU, for loading outside a training run
    (generate, serve, export); a training run resolves ``auto`` from ``train.precision``
    first (:meth:`leantune.model.precision.Precision.weight_dtype`)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """``(name_or_path, gguf_file)`` with ``embedded:`` names replaced by package files."""
    if cfg.name_or_path == "embedded:smollm2":
        from leantune.data.embedded import smollm2_gguf

        path = smollm2_gguf()
        return str(path.parent), path.name
    if cfg.name_or_path.startswith("embedded:"):
        raise ModelError(f"model.name_or_path: unknown embedded model {cfg.name_or_path!r}; "
                         "the only one is 'embedded:smollm2'")
    return cfg.name_or_path, cfg.gguf_file


def _gguf_cache_dir(cfg: ModelConfig, path: Path) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("LEANTUNE_CACHE", "~/.cache/leantune")).expanduser()
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return root / "gguf" / f"{path.stem}-{key[:12]}"


def dequantize_gguf(cfg: ModelConfig, directory: str, gguf_file: str) -> Path:
    """Dequantize ``directory/gguf_file`` to an fp32 HF directory, once; return its path.

    The copy is written to a temporary directory and renamed into place, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    path = Path(directory) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: {path} does not exist")
    target = _gguf_cache_dir(cfg, path)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once into %s (about 30 s per 100 M parameters)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    except (ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot be loaded as a causal LM by transformers ({e})") from None
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    """The tokenizer of the model, with a pad token (EOS when it has none).

    Raises:
        ModelError: no tokenizer can be read from ``source`` (one line saying what to add).
    """
    source = source or resolve_local(cfg)
    check_exists(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code,
                                                  revision=cfg.revision)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise ModelError(f"{source}: no tokenizer can be read there (tokenizer.json or "
                             "tokenizer_config.json); copy the base model's tokenizer files "
                             f"into it ({first_line(e)})") from None
        raise ModelError(f"{source!r} is not a local directory, and the hub could not provide "
                         f"its tokenizer ({first_line(e)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_config(config):
    """The config of the text model inside ``config`` (a composite model's language tower),
    or ``config`` itself where there is none or several (transformers then refuses to pick)."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return config


def config_size(config, *keys: str) -> int | None:
    """The first of ``keys`` that ``config`` sets to a positive int, else None.

    A per-layer list (Gemma-3n's ``intermediate_size``, one entry per layer) gives its most
    common entry: these sizes describe a typical layer, for measurements and the FLOPs
    ledger. Anything else (missing, None, a dict) is skipped."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            sizes = [v for v in value if type(v) is int and v > 0]
            value = max(sizes, key=sizes.count) if sizes else None
        if type(value) is int and value > 0:  # not bool, not a float
            return value
    return None


def first_line(error: BaseException) -> str:
    """The first line of a library's (often multi-line) error message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def has_weights(directory: Path) -> bool:
    """Whether ``directory`` holds weight files transformers reads (``*.bin`` only through
    ``torch.load(weights_only=True)``)."""
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))


def check_exists(source: str) -> None:
    """A path-like source (``/``, ``./``, ``~``) that is missing is a typo, not a hub id."""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"model.name_or_path: no such directory: {source}")


def resolve_local(cfg: ModelConfig) -> str:
    """Where to load weights from: a GGUF file's cached HF copy, or the given name/path."""
    name, gguf_file = resolve_source(cfg)
    if gguf_file is not None:
        return str(dequantize_gguf(cfg, name, gguf_file))
    return name


def load_model(cfg: ModelConfig, source: str | None = None, quantization=None,
               device: torch.device | str | None = None) -> PreTrainedModel:
    """Load the causal LM described by ``cfg`` (weights via safetensors when available).

    Args:
        quantization: a ``BitsAndBytesConfig`` (QLoRA): the base is quantized as it loads,
            straight onto ``device`` (default: this process's GPU, else the CPU).

    Raises:
        FileNotFoundError: a local directory without config or weights.
    """
    source = source or resolve_local(cfg)
    check_exists(source)
    extra = {}
    if quantization is not None:
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        extra = {"quantization_config": quantization, "device_map": {"": str(device)}}
    local = Path(source)
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} has no config.json: not a Hugging Face model directory")
    if local.is_dir() and not has_weights(local):
        raise FileNotFoundError(f"{local} has a config.json but no weights (*.safetensors, or "
                                "*.bin read with weights_only); copy the model's weight files "
                                "into it")
    if cfg.trust_remote_code:
        log.warning("trust_remote_code=true: running model code shipped with %s", source)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(cfg.dtype),
            attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, use_safetensors=None,
            output_loading_info=True, **extra)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model weights from {source}: {first_line(e)}"
                                ) from None
    except ValueError as e:  # e.g. an architecture that has no causal-LM head
        raise ModelError(f"{source}: cannot be loaded as a causal LM ({first_line(e)})") from None
    # Training and eval never use a KV cache: with one, transformers silently stops
    # honouring packed position_ids (docs/architecture.md, "What passes between stages").
    model.config.use_cache = False
    if quantization is not None:
        keep_4bit_compute(model)  # before any no-grad forward, such as the check below
    check_causal_lm(model, source, info["missing_keys"])
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_causal_lm(model: PreTrainedModel, source: str, missing: list[str]) -> None:
    """Refuse a checkpoint that loads under a causal-LM class but is not one.

    Two ways this happens with ``AutoModelForCausalLM``: an encoder or base-model checkpoint
    (e.g. ``BertModel``) gets a freshly initialised LM head (``missing`` names its
    weights), or a bidirectional encoder (``is_decoder=False``) lets each position see the
    tokens after it, which :func:`future_leak` measures.
    """
    head = model.get_output_embeddings()
    head_names = {n for n, p in model.named_parameters()
                  if head is not None and any(p is q for q in head.parameters())}
    arch = ", ".join(model.config.architectures or [model.config.model_type])
    if head_names & set(missing):
        raise ModelError(f"{source}: the checkpoint ({arch}) has no LM-head weights, so it is "
                         "not a causal LM; use a checkpoint saved with a causal-LM head")
    if missing:
        log.warning("%s: %d weights are missing from the checkpoint and were initialised at "
                    "random (e.g. %s)", source, len(missing), ", ".join(missing[:3]))
    if future_leak(model) > leak_tolerance(model):
        raise ModelError(f"{source}: {type(model).__name__} ({arch}) lets each token see the "
                         "tokens after it: it is not a causal LM and cannot be trained to "
                         "predict the next token")


@contextmanager
def evaluating(model: torch.nn.Module, training: bool = False) -> Iterator[None]:
    """``model`` in eval mode (train mode with ``training``) for the block, then every
    module back in the mode it was in.

    ``model.train(was_training)`` would not do: PEFT marks its wrapper as training while
    the base's dropout layers stay in eval, and ``train(True)`` would switch them on."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


@torch.no_grad()
def future_leak(model: torch.nn.Module) -> float:
    """``max |Δ logits| / max |logits|`` over the first 4 positions of a 6-token input
    when tokens 5-6 change: 0 (or rounding) for a causal LM, large for a model that
    attends forward."""
    vocab = text_config(model.config).vocab_size
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=g)
    ids[1, :4] = ids[0, :4]
    with evaluating(model):
        logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :4].float()
    return float((logits[0] - logits[1]).abs().max() / logits.abs().max().clamp_min(1e-12))


def keep_4bit_compute(model: torch.nn.Module) -> None:
    """Keep 4-bit layers on the path they train on.

    On CPUs with AVX512-bf16, bitsandbytes (0.50) repacks a 4-bit weight for a bf16 kernel
    on its first no-grad forward: eval would then compute in bf16 (not what training
    used), and a layer narrower than its 64-wide block fails outright.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def leak_tolerance(model: torch.nn.Module) -> float:
    """Largest :func:`future_leak` that is float rounding rather than a token seeing later
    ones."""
    return tolerance_for(next(model.parameters()).dtype).logits
