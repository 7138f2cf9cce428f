"""``leantune export RUN_DIR --format gguf``: one GGUF file for llama.cpp, Ollama, LM Studio.

The run is merged first (:func:`leantune.export.merge.export_run`: LoRA, DoRA, IA3, QLoRA
dequantized then merged, full fine-tuning), then written with gguf-py: ``GGUFWriter``,
``TensorNameMap`` for the tensor names and ``gguf.quants`` for the weights.

- Architectures (``ARCHES``): Llama and Mistral (llama.cpp's ``llama``), Qwen2, Qwen3.
- Weights: every 2-D weight in ``--quant`` (f32, f16, bf16; q8_0, q5_0, q4_0: blocks of 32
  weights with one scale; q4_1: a scale and a minimum); norms and biases stay f32, as
  llama.cpp's own converter leaves them. In the 4- and 5-bit types the output head (the
  token embedding when tied) stays q8_0: llama.cpp's quantizer keeps it at 6 bits, a type
  gguf-py cannot write, because the logits feel its error most (the quickstart's
  perplexity at q4_0: 25.8 with the head at 4 bits, 24.0 at 8). A row whose length 32
  does not divide falls back to f16.
- RoPE: transformers rotates the two halves of each head, llama.cpp's ``llama`` rotates
  adjacent pairs, so Llama/Mistral q/k rows are permuted per head from
  ``[r_0 .. r_{d/2-1}, r_{d/2} .. r_{d-1}]`` to ``[r_0, r_{d/2}, r_1, r_{d/2+1}, ..]``
  (readers undo it). Qwen2/3 use the half rotation (NEOX) in llama.cpp: no permutation.
  ``linear`` scaling is written as such; ``llama3`` scaling as llama.cpp's
  ``rope_freqs`` tensor, ``f_i = inv_freq_i / inv_freq_llama3_i`` (llama.cpp divides
  each rotation frequency by it).
- Tied embeddings: no ``output.weight``; llama.cpp then reuses ``token_embd``.

The file is written beside ``--out`` as ``.<name>.tmp-<pid>`` and renamed when complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from leantune.common.files import atomic_file
from leantune.export.gguf import GGUF_QUANTS as QUANTS
from leantune.export.merge import ExportError, export_run

# HF class -> (gguf-py MODEL_ARCH member, whether q/k rows are permuted for llama.cpp).
ARCHES = {"LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
          "Qwen2ForCausalLM": ("QWEN2", False), "Qwen3ForCausalLM": ("QWEN3", False)}
ROPE_TYPES = ("default", "linear", "llama3")


class GGUFExportError(ExportError):
    """The model cannot be written as GGUF (the message says why and what is supported)."""


def permute_for_llama_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """``[heads * d, ...]`` rows in HF's half-rotation order -> llama.cpp's pair order."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def model_arch(config, where: str = ""):
    """``(gguf-py MODEL_ARCH, whether q/k rows are permuted)`` for a HF config.

    Raises:
        GGUFExportError: an architecture not in :data:`ARCHES`.
    """
    import gguf

    arch_class = (config.architectures or ["?"])[0]
    if arch_class not in ARCHES:
        raise GGUFExportError(f"{where}{arch_class} cannot be exported to GGUF yet; "
                              f"supported: {', '.join(sorted(ARCHES))}")
    arch_name, permute = ARCHES[arch_class]
    return getattr(gguf.MODEL_ARCH, arch_name), permute


def rope_rows(module_path: str, rows: np.ndarray, config) -> np.ndarray:
    """``rows`` (the output rows of ``module_path``'s weight, or of a LoRA B) permuted for
    llama.cpp's RoPE when the module is a Llama/Mistral q or k projection; else as is."""
    heads = config.num_attention_heads
    if module_path.endswith("self_attn.q_proj"):
        return permute_for_llama_rope(rows, heads)
    if module_path.endswith("self_attn.k_proj"):
        return permute_for_llama_rope(rows, getattr(config, "num_key_value_heads", None)
                                      or heads)
    return rows


def pack(data: np.ndarray, kind):
    """``(bytes-or-array, type)``: ``data`` in the GGML type ``kind``; a block type whose
    block of 32 does not divide the row falls back to f16."""
    import gguf

    types = gguf.GGMLQuantizationType
    if kind not in (types.F32, types.F16, types.BF16) and data.shape[-1] % 32:
        kind = types.F16
    return (data if kind == types.F32 else gguf.quants.quantize(data, kind)), kind


def export_gguf(run_dir: Path, out: Path, quant: str = "f16") -> dict:
    """Merge ``run_dir`` and write it as one GGUF, with an Ollama ``Modelfile`` beside it.

    Args:
        out: a ``.gguf`` path, or a directory that gets ``model-<quant>.gguf``.

    Returns:
        :func:`export_run`'s dict with ``out``, ``bytes``, ``modelfile``, ``architecture``,
        ``quant``, ``tokenizer``, ``pre`` and ``warnings`` added.
    """
    from transformers import AutoTokenizer

    from leantune.export.gguf.ollama import default_system, is_chatml, ollama_modelfile

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    out = _new_file(out, f"model-{quant}.gguf")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-") as merged_dir:
        merged = Path(merged_dir) / "model"
        result = export_run(run_dir, merged)
        info = _write_file_atomically(out, lambda tmp: write_gguf(merged, tmp, quant))
        tokenizer = AutoTokenizer.from_pretrained(merged)
    stops = ["<|im_end|>"] if is_chatml(tokenizer.chat_template) else []
    modelfile = out.with_name(f"{out.stem}.Modelfile")
    modelfile.write_text(ollama_modelfile(out.name, tokenizer.chat_template,
                                          stops + [tokenizer.eos_token or ""],
                                          default_system(tokenizer)))
    return result | info | {"out": str(out), "bytes": out.stat().st_size,
                            "modelfile": str(modelfile)}


def _new_file(out: Path, default_name: str) -> Path:
    """``out`` itself when it names a ``.gguf`` file, else ``out / default_name``; refused
    when it exists. Its directory is created."""
    if out.suffix != ".gguf":
        out = out / default_name
    if out.exists():
        raise GGUFExportError(f"{out} exists; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_file_atomically(out: Path, write):
    """``write(tmp)`` to a temporary file beside ``out``, renamed to ``out`` when it returns;
    removed if it raises. Returns what ``write`` returns."""
    with atomic_file(out) as tmp:
        return write(tmp)


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f16") -> dict:
    """Write the HF model directory ``model_dir`` as the GGUF file ``out_file``.

    Returns ``{"architecture", "quant", "tensors", "tokenizer", "pre", "warnings"}``.

    Raises:
        GGUFExportError: an architecture, quantization or RoPE scaling not listed above,
            or a tensor gguf-py has no name for.
    """
    import gguf
    from transformers import AutoConfig

    from leantune.export.gguf.vocab import VocabularyError, add_vocabulary

    config = AutoConfig.from_pretrained(model_dir)
    arch, permute = model_arch(config, f"{model_dir}: ")
    if quant not in QUANTS:
        raise GGUFExportError(f"quant {quant!r}: choose from {', '.join(QUANTS)}")
    name = gguf.MODEL_ARCH_NAMES[arch]
    # Tensors are read one at a time and spooled to a temporary file as they are packed,
    # so memory holds one f32 tensor, not the model (a 7B model is 28 GB in f32).
    writer = gguf.GGUFWriter(str(out_file), name, use_temp_file=True)
    try:
        rope_freqs = _add_architecture(writer, config, quant)
        count = _add_tensors(writer, _saved_tensors(Path(model_dir)), config, arch, permute,
                             quant, rope_freqs)
        try:
            vocab = add_vocabulary(writer, Path(model_dir), config.vocab_size)
        except VocabularyError as e:
            raise GGUFExportError(str(e)) from None
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"architecture": name, "quant": quant, "tensors": count} | vocab


def _add_architecture(writer, config, quant: str) -> np.ndarray | None:
    """The hyper-parameters llama.cpp reads; returns the ``rope_freqs`` factors, if any."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    file_type = "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise GGUFExportError(f"RoPE scaling {rope_type!r} cannot be written to GGUF yet; "
                              f"supported: {', '.join(ROPE_TYPES)}")
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope_type != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = float(rope["rope_theta"])
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float().numpy()


def _saved_tensors(model_dir: Path):
    """``(name, tensor)`` for every tensor of the directory's safetensors files, lazily."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _add_tensors(writer, tensors, config, arch, permute: bool, quant: str, rope_freqs) -> int:
    """Every ``(HF name, tensor)`` under its GGUF name, in its GGUF type; returns the
    tensor count."""
    import gguf

    types = gguf.GGMLQuantizationType
    qtype = getattr(types, quant.upper())
    low_bits = qtype in (types.Q5_0, types.Q4_1, types.Q4_0)
    names = gguf.TensorNameMap(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    if rope_freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          rope_freqs, raw_dtype=types.F32)
        count += 1
    for key, tensor in tensors:
        if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd; RoPE frequencies come from the metadata
        base, _, suffix = key.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise GGUFExportError(f"{key}: gguf-py has no GGUF name for this tensor")
        data = tensor.detach().float().numpy()
        if permute:
            data = rope_rows(base, data, config)
        kind = qtype if data.ndim == 2 else types.F32
        if low_bits and (mapped == "output" or (tied and mapped == "token_embd")):
            kind = types.Q8_0
        packed, kind = pack(data, kind)
        writer.add_tensor(f"{mapped}.{suffix}", packed, raw_dtype=kind)
        count += 1
    return count
