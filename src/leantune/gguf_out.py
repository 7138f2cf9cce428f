"""WIP (issue 20): write a merged Hugging Face model directory as one GGUF file.

Written with gguf-py (``GGUFWriter``, ``TensorNameMap``, its quantizers). Llama-family
(Llama, SmolLM2, Mistral) and Qwen2 only so far. llama.cpp applies RoPE to Llama's q/k
in interleaved pairs where transformers rotates halves, so those two projections are
permuted on the way out (per head: rows ``[h0 .. h_{d/2-1}, h_{d/2} ..]`` become
``[h0, h_{d/2}, h1, h_{d/2+1}, ..]``); transformers' GGUF loader undoes it. Qwen2 uses
NEOX-style RoPE in llama.cpp, so its q/k go out as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCHES = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
          "Qwen2ForCausalLM": "QWEN2"}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (the message says why and what is supported)."""


def _interleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's half-rotation row order per head -> llama.cpp's pairwise order."""
    rows = w.shape[0]
    return (w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f32") -> dict:
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    arch_class = (config.architectures or ["?"])[0]
    if arch_class not in ARCHES:
        raise GGUFExportError(f"{model_dir}: {arch_class} cannot be exported to GGUF yet; "
                              f"supported: {', '.join(sorted(ARCHES))}")
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    arch = getattr(gguf.MODEL_ARCH, ARCHES[arch_class])
    name = gguf.MODEL_ARCH_NAMES[arch]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.TensorNameMap(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out_file), name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        config, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd
        base, _, suffix = key.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise GGUFExportError(f"{key}: no GGUF name for this tensor")
        data = tensor.numpy()
        if ARCHES[arch_class] == "LLAMA" and base.endswith("self_attn.q_proj"):
            data = _interleave_rope_rows(data, heads)
        elif ARCHES[arch_class] == "LLAMA" and base.endswith("self_attn.k_proj"):
            data = _interleave_rope_rows(data, kv_heads)
        # Norms and biases stay f32, as llama.cpp expects; 2-D weights take the quant.
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and \
                data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # block size 32 does not divide the row
        packed = gguf.quants.quantize(data, kind) if kind != gguf.GGMLQuantizationType.F32 \
            else data
        writer.add_tensor(f"{mapped}.{suffix}", packed, raw_dtype=kind)
    _add_tokenizer(writer, tokenizer, model_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"out": str(out_file), "architecture": name, "quant": quant}


def _add_tokenizer(writer, tokenizer, model_dir: Path) -> None:
    """A byte-level BPE vocabulary (``gpt2``), its merges, special tokens, chat template."""
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED
             if i in added else gguf.TokenType.NORMAL for i in range(size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads((Path(model_dir) / "tokenizer.json").read_text())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def ollama_modelfile(gguf_name: str, chat_template: str | None, stops: list[str]) -> str:
    """An Ollama ``Modelfile`` for ``gguf_name`` beside it: ``FROM``, the stop tokens, and a
    ``TEMPLATE`` when the chat template is ChatML (SmolLM2's, Qwen2's); for any other, a
    note that Ollama reads the template from the GGUF's ``tokenizer.chat_template``."""
    lines = [f"FROM ./{gguf_name}"]
    template = chat_template or ""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    else:
        lines.append("# No TEMPLATE: this chat template is not ChatML, the one format this "
                     "writer translates; Ollama reads tokenizer.chat_template from the GGUF.")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
