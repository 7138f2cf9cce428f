"""Tiny random models of every causal-LM architecture transformers knows, and a tiny
tokenizer and chat data set to train them on: the material of ``leantune bench
architectures`` and of its test slice.

A model type's config class is built from its defaults with the sizes shrunk
(:data:`SIZES`: hidden 64, 2 layers, 4 heads, 4 experts, the tokenizer's vocabulary),
per-layer lists cut to the new layer count *and kept as lists* (Gemma-3n's per-layer
``intermediate_size`` is a trap in itself), and the few per-type changes the config
validators insist on (:data:`FIXES`). :data:`VARIANTS` are configs of released
checkpoints whose defaults hide a packing trap.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

SIZES = {  # config key -> tiny value, set when the config has the key
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "intermediate_size_mlp": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "n_layer": 2,
    "num_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_head": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "n_positions": 512, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
    "moe_num_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 16,
    "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8,
    "mamba_n_heads": 4, "mamba_d_head": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 4, "sliding_window": 24, "attention_chunk_size": 48,
    "rotary_dim": 8, "mamba_expand": 2, "d_head": 16,
    # encoder-decoder families' decoders (BART, Whisper, PLBart: their causal LMs)
    "decoder_layers": 2, "encoder_layers": 2, "num_decoder_layers": 2, "num_encoder_layers": 2,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    # expert routing and its groups (no more groups than experts)
    "num_experts_per_token": 2, "moe_k": 2, "num_expert_group": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "n_groups": 1, "mamba_n_groups": 1,
    # linear attention, state spaces, per-layer inputs (Kimi, xLSTM, Gemma-3n)
    "linear_num_heads": 4, "linear_head_dim": 16, "embedding_dim": 64, "num_blocks": 2,
    "hidden_size_per_layer_input": 8, "laurel_rank": 8, "altup_num_inputs": 2,
    "mamba_dt_rank": 8,
    # sparse attention's indexers: top-k well below the rows' length (DOTS3, Kolibri, HY-V4)
    "index_head_dim": 16, "index_n_heads": 4, "index_num_heads": 2, "index_topk": 16,
    "shared_experts_intermediate_size": 32, "mlp_only_intermediate_size": 128,
    # BLT's byte patches: the global model's width, the hashed n-gram table
    "hidden_size_global": 64, "encoder_hash_byte_group_vocab": 1024,
    # widths and windows under other names (XLM, Inkling2, Ergo, RecurrentGemma)
    "emb_dim": 64, "lru_width": 64, "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2, "swa_head_dim": 16, "first_dense_intermediate_size": 128,
    "shared_intermediate_size": 32, "sliding_window_size": 24, "attention_window_size": 24,
}
# The config's text part, where transformers cannot tell which one it is.
TEXT_KEYS = {"musicgen": "decoder", "musicgen_melody": "decoder"}
# What some config validators and models insist on beyond SIZES: model type -> changes.
FIXES: dict[str, dict] = {
    "mamba2": {"head_dim": 32}, "bamba": {"mamba_d_head": 32},
    "falcon_h1": {"mamba_d_head": 32, "mamba_d_ssm": 128},
    "granitemoehybrid": {"mamba_d_head": 32},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "zaya": {"num_experts_per_tok": 1}, "reformer": {
        "is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 32],
        "attn_layers": ["local", "local"]},
    # default configs that do not run as they are
    "cohere_compass_text": {"rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}},
    "xmod": {"default_language": "en_XX"},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # Gemma-3n: 4 layers, so the last two share the first two's keys and values
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "intermediate_size": [128] * 4,
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},
    # Dory's config counts attention and MLP blocks (2 per layer): 3 layers, one looped
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2,
             "n_output_layers": 2, "layer_types": [
                 "sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
    # Zamba's shared attention block needs two hybrid layers to share it
    "zamba": {"num_hidden_layers": 3, "attention_hidden_size": 128, "attention_head_dim": 32,
              "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # DOTS3's sliding layers (the second) take head_dim = qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_text": {"per_layer_config": {"1": {
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
        "kv_lora_rank": 16, "head_dim": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
        "v_head_dim": 16}}},
    # Qwen4-Exp's query-sparse attention has no default indexer
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 32, "indexer_compress_ratio": 4, "hc_lowrank": 16,
                       "ngram_vocab_size_base": 1024, "split_ngram_parts": 4},
    "musicgen": {"num_codebooks": 1}, "musicgen_melody": {"num_codebooks": 1},
}
FIXES["gemma3n"] = FIXES["gemma3n_text"]
FIXES["qwen4_exp"] = FIXES["qwen4_exp_text"]
FIXES["dots3_note"] = FIXES["dots3_note_text"]
# Model types that cannot run as a causal LM on their own: type -> why.
CANNOT = {t: "a draft model for assisted generation: its forward needs the target model's "
             "inputs_embeds and shared_kv_states" for t in (
                 "gemma4_assistant", "gemma4_unified_assistant")}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Configs of real checkpoints whose defaults hide a packing trap: name -> (type, changes).
VARIANTS: dict[str, tuple[str, dict]] = {
    "phi3 long-rope (Phi-3.5-mini)": ("phi3", {
        "max_position_embeddings": 512, "original_max_position_embeddings": 90,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                            "original_max_position_embeddings": 90}}),
    "llama dynamic-ntk": ("llama", {"rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama4_text floor_scale=16": ("llama4_text", {"floor_scale": 16}),
    # Lfm2Config's defaults are attention only; the released checkpoints mix in convolutions.
    "lfm2 conv + attention (LFM2-350M)": ("lfm2", {"layer_types": ["conv", "full_attention"]}),
}


def all_kinds() -> dict[str, tuple[str, dict | None]]:
    """Every causal-LM model type (sorted) and then :data:`VARIANTS`: name -> (type, changes)."""
    return {k: (k, None) for k in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} | VARIANTS


def tiny_config(model_type: str, changes: dict | None = None, vocab: int = 512):
    """The config class's defaults with :data:`SIZES` (``vocab`` for every vocabulary
    size), :data:`FIXES` and ``changes`` applied to its text config, and per-layer
    settings cut to the new layer count.

    Returns the text config, or the composite config around it where the text config's
    own type has no causal-LM class (Emu3, Mllama: their causal LM reads the composite).
    """
    defaults = AutoConfig.for_model(model_type)
    text = (getattr(defaults, TEXT_KEYS[model_type]) if model_type in TEXT_KEYS
            else defaults.get_text_config())
    base = text.to_dict()
    sized = base | _shrink(base, vocab)
    explicit = FIXES.get(model_type, {}) | (changes or {})
    merged = _merge(sized, explicit)
    merged |= _cut_per_layer(merged, _layer_count(base), set(explicit))
    # The class's fields (and their aliases) and what changed: what it derived from the
    # full sizes (Zamba2's attention sizes) it derives again from the tiny ones.
    keep = {f.name for f in dataclasses.fields(type(text))} | set(type(text).attribute_map)
    config = type(text)(**{k: v for k, v in merged.items()
                           if k in keep or k not in base or base[k] != v})
    if (text is defaults or model_type in TEXT_KEYS
            or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return config
    key = next(k for k in defaults.sub_configs if getattr(defaults, k) is text)
    return type(defaults)(**{key: config.to_dict()})


def _shrink(values: dict, vocab: int) -> dict:
    """:data:`SIZES` for the keys ``values`` has (a per-layer list of sizes stays a list,
    of the tiny size), ``vocab`` for each ``vocab_size*`` (Gemma-3n's per-layer inputs
    too), and the same inside sub-configs (DBRX's ``ffn_config``) and per-layer overrides
    (DOTS3's ``per_layer_config``); multi-head latent attention's head sizes follow."""
    over = {}
    for key, value in values.items():
        if key in SIZES:
            tiny = SIZES[key]
            over[key] = [tiny] * len(value) if isinstance(value, list) else tiny
        elif key.startswith(("vocab_size", "unpadded_vocab_size")) and type(value) is int:
            over[key] = vocab
        elif isinstance(value, dict) and any(k in SIZES for k in value):
            over[key] = value | _shrink(value, vocab)
        elif _by_layer(value) and all(isinstance(v, dict) for v in value.values()):
            over[key] = {k: v | _shrink(v, vocab) for k, v in value.items()}
    if "qk_rope_head_dim" in values:  # multi-head latent attention: head dims derived
        rope, nope = SIZES["qk_rope_head_dim"], SIZES["qk_nope_head_dim"]
        over |= {k: v for k, v in (("head_dim", rope), ("qk_head_dim", rope + nope))
                 if k in values}
        if "num_key_value_heads" in values:  # latent KV: no groups
            over["num_key_value_heads"] = SIZES["num_attention_heads"]
    return over


def _merge(values: dict, changes: dict) -> dict:
    """``values`` with ``changes``; a sub-config changed by a dict is updated, not replaced
    (a ``{layer: ...}`` dict is replaced)."""
    out = dict(values)
    for key, value in changes.items():
        old = out.get(key)
        out[key] = (old | value if isinstance(old, dict) and isinstance(value, dict)
                    and not _by_layer(value) else value)
    return out


def _by_layer(value) -> bool:
    """Whether ``value`` is a ``{layer index: setting}`` dict."""
    return isinstance(value, dict) and bool(value) and all(str(k).isdigit() for k in value)


def _layer_count(values: dict) -> int | None:
    return next((values[k] for k in LAYER_KEYS if type(values.get(k)) is int), None)


def _cut_per_layer(values: dict, full: int | None, explicit: set[str]) -> dict:
    """Per-layer settings of ``values`` (made for ``full`` layers) cut to its layer count:
    lists of one entry per layer keep every kind they hold (raising the count where the
    layers are too few); lists of layer indices name the last layer; ``{layer: value}``
    dicts drop the rest. Keys in ``explicit`` (set by a fix or a variant) stay as set."""
    layers, out = _layer_count(values), {}
    if not (layers and full and full > layers):
        return out
    per_layer = {k: v for k, v in values.items()
                 if isinstance(v, list) and len(v) == full and k not in explicit | set(LAYER_KEYS)}
    for value in per_layer.values():  # as many layers as the most kinds a list holds
        kinds = len(set(map(str, value)))
        layers = max(layers, kinds) if kinds <= 4 else layers
    for key, value in per_layer.items():
        out[key] = _keep_kinds(value, layers)
    for key, value in values.items():
        if key in explicit or key in per_layer:
            continue
        if (isinstance(value, list) and value and len(value) < full
                and all(type(v) is int and 0 <= v < full for v in value)
                and any(w in key for w in ("idx", "indices", "_layers", "layer_ids"))):
            out[key] = [layers - 1]  # the last layer, so the first keeps the other kind
        elif _by_layer(value):
            out[key] = {k: v for k, v in value.items() if int(k) < layers}
    if layers != _layer_count(values):  # a list with more kinds than layers raised it
        out |= {k: layers for k in LAYER_KEYS if k in values}
    return out


def _keep_kinds(value: list, n: int) -> list:
    """The first ``n`` entries of a per-layer list, its later kinds (up to ``n``) put in
    place of the last repeated ones, in the order they first appear."""
    names = list(map(str, value))
    cut = value[:n]
    for kind in list(dict.fromkeys(names))[:n]:
        have = list(map(str, cut))
        if kind not in have:
            slot = max(i for i, k in enumerate(have) if have.count(k) > 1)
            cut[slot] = value[names.index(kind)]
    return cut


class NotBuilt(Exception):
    """A model type listed in :data:`CANNOT`: no tiny model is built for it."""


def build_tiny(model_type: str, changes: dict | None = None, vocab: int = 512,
               seed: int = 0) -> torch.nn.Module:
    """The tiny random model (on sdpa where the class supports it, else its default), in
    eval mode, after one plain forward: a model that cannot run even that is the
    shrinker's failure, not a packing trap.

    Raises:
        NotBuilt: ``model_type`` cannot run as a causal LM alone (:data:`CANNOT`).
    """
    if model_type in CANNOT:
        raise NotBuilt(CANNOT[model_type])
    config = tiny_config(model_type, changes, vocab)
    torch.manual_seed(seed)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # MusicGen's decoder
        model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(config)
    else:
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except (ValueError, ImportError):  # no sdpa: the model's own default (a fresh
            torch.manual_seed(seed)        # config: the refused one keeps asking for sdpa)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, changes, vocab))
    model.config.use_cache = False
    model.eval()
    with torch.no_grad():
        ids = torch.randint(5, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, use_cache=False)
    return model


# --- a tiny tokenizer and chat data to train the tiny models on -------------------------

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0-4, as SIZES says
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system: hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    "Instruction: translate. Input: bonjour. Response: hello. ### Response:",
] * 20


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 300 tokens trained here on :data:`CORPUS`, with a chat template
    (ChatML by default): pad 0, BOS 1, EOS ``<|im_end|>`` 4 (the ids :data:`SIZES` gives
    the models). The test suite's tiny models use it too."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = chat_template
    return fast


def chat_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """``n`` ``{"messages": [user, assistant]}`` rows of 1-8 and 1-24 words (about 15 to
    100 tokens a row with the template): a micro-batch of 8 packs several to a 128-token
    row and leaves pad tails of varied length."""
    words = " ".join(CORPUS[:5]).split()
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"messages": [{"role": "user", "content": text(1, 8)},
                          {"role": "assistant", "content": text(1, 24 if i % 3 else 4)}]}
            for i in range(n)]


def save_tiny(directory: Path, model: torch.nn.Module, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved as a local Hugging Face model directory."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_chat_data(path: Path, rows: list[dict]) -> Path:
    """``rows`` written as the JSONL file ``leantune train`` reads (``data.path``)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
