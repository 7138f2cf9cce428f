"""``leantune export RUN_DIR --format gguf-lora``: the LoRA adapter alone, as the GGUF file
llama.cpp applies over a base model at load time (``llama-cli -m BASE.gguf --lora FILE``).

llama.cpp's adapter format (read by its ``llama_adapter_lora_init``): ``general.type =
adapter``, ``adapter.type = lora``, the base's ``general.architecture``, and for each
adapted weight ``W`` (GGUF name ``blk.N.attn_q.weight`` ...) two tensors
``<name>.lora_a`` ``[r, in]`` and ``<name>.lora_b`` ``[out, r]``, so that it computes
``W x + scale * B (A x)`` with ``scale = alpha / r`` when ``adapter.lora.alpha`` is set
and ``1`` when it is not. PEFT's per-module scaling (``alpha / r``, or ``alpha / sqrt(r)``
with rsLoRA, rank and alpha patterns included) is folded into ``B`` and no alpha is
written, so every module keeps its own scale. Llama/Mistral q/k rows of ``B`` are
permuted as the base's are (:func:`rope_rows`).

Only plain LoRA (and QLoRA's adapter: llama.cpp then adds it to whatever base file it is
given) can be written: DoRA rescales each merged column by a magnitude vector, which the
format has no place for; IA3, prompt tuning and ReFT are not low-rank weight deltas.
"""

from __future__ import annotations

from pathlib import Path

from leantune.export.gguf import GGUF_QUANTS
from leantune.export.gguf.writer import (
    GGUFExportError,
    _new_file,
    _write_file_atomically,
    model_arch,
    pack,
    rope_rows,
)

LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")
assert set(LORA_QUANTS) <= set(GGUF_QUANTS)


def lora_pairs(model) -> dict[str, tuple]:
    """``{module path (e.g. model.layers.0.self_attn.q_proj): (A [r, in], B * scaling
    [out, r])}`` from a PEFT LoRA model, as float32 numpy arrays.

    Raises:
        GGUFExportError: no LoRA layer, a DoRA layer, or a LoRA on an embedding.
    """
    from peft.tuners.lora import LoraLayer

    pairs = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not module.lora_A:
            continue
        name = next(iter(module.lora_A))
        if module.use_dora.get(name):
            raise GGUFExportError("DoRA cannot be written as a llama.cpp LoRA adapter (its "
                                  "magnitude vector has no place in the format); export "
                                  "--format gguf writes the merged model instead")
        if name in getattr(module, "lora_embedding_A", {}):
            raise GGUFExportError(f"{path}: a LoRA on an embedding cannot be written as a "
                                  "llama.cpp adapter yet; export --format gguf merges it")
        a = module.lora_A[name].weight.detach().float()
        b = module.lora_B[name].weight.detach().float() * module.scaling[name]
        pairs[path.removeprefix("base_model.model.")] = (a.numpy(), b.numpy())
    if not pairs:
        raise GGUFExportError("this run has no LoRA layers; --format gguf-lora writes LoRA "
                              "(or QLoRA) adapters only; --format gguf writes any method merged")
    return pairs


def write_gguf_lora(run_dir: Path, out_file: Path, quant: str = "f32") -> dict:
    """Write ``run_dir``'s LoRA adapter as a llama.cpp LoRA GGUF at ``out_file``.

    Returns ``{"architecture", "quant", "tensors", "base"}``: ``base`` is the run's own base
    GGUF file when it was trained from one (the quickstart's SmolLM2), else None.
    """
    import gguf

    from leantune.adapters.loading import load_target

    if quant not in LORA_QUANTS:
        raise GGUFExportError(f"--quant {quant!r} for gguf-lora: choose from "
                              f"{', '.join(LORA_QUANTS)} (llama.cpp adapters)")
    model, _, cfg, _ = load_target(run_dir)
    config = model.base_model.model.config if hasattr(model, "base_model") else model.config
    arch, permute = model_arch(config)
    names = gguf.TensorNameMap(arch, config.num_hidden_layers)
    kind = getattr(gguf.GGMLQuantizationType, quant.upper())
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    count = 0
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        for path, (a, b) in lora_pairs(model).items():
            mapped = names.get_name(path)
            if mapped is None:
                raise GGUFExportError(f"{path}: gguf-py has no GGUF name for this module")
            if permute:
                b = rope_rows(path, b, config)
            for suffix, data in (("lora_a", a), ("lora_b", b)):
                packed, t = pack(data, kind)
                writer.add_tensor(f"{mapped}.weight.{suffix}", packed, raw_dtype=t)
                count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    base = None
    if cfg is not None:
        from leantune.model.load import resolve_source

        directory, name = resolve_source(cfg.model)
        base = str(Path(directory) / name) if name else None
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "quant": quant, "tensors": count,
            "base": base}


def export_gguf_lora(run_dir: Path, out: Path, quant: str = "f32") -> dict:
    """Write ``run_dir``'s LoRA adapter alone as a llama.cpp LoRA GGUF (``out``: a ``.gguf``
    path or a directory that gets ``lora-<quant>.gguf``); see :func:`write_gguf_lora`."""
    out = _new_file(out, f"lora-{quant}.gguf")
    info = _write_file_atomically(out, lambda tmp: write_gguf_lora(run_dir, tmp, quant))
    return info | {"out": str(out), "bytes": out.stat().st_size, "method": "lora",
                   "note": None, "warnings": []}
