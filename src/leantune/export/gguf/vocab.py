"""The vocabulary half of a GGUF file, as llama.cpp reads it (gguf-py key names).

Two kinds of Hugging Face fast tokenizer (``tokenizer.json``) are written:

- **Byte-level BPE** (GPT-2 style: SmolLM2, Llama 3, Qwen2/3, Mistral Nemo):
  ``tokenizer.ggml.model = "gpt2"``, one token string per id (holes filled with
  ``[PAD<i>]`` of type UNUSED, up to the embedding's row count), token types (added special
  tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges, and
  ``tokenizer.ggml.pre``. llama.cpp does not run ``tokenizer.json``'s pre-tokenizer; it
  picks one of its own built-in splits by that name, so the name must say how the text
  was split when the merges were learned. :func:`pre_tokenizer_name` recognises the
  splits below from the pre-tokenizer's structure; any other is written as ``default``
  with a warning, since llama.cpp may then cut some text into other tokens.
- **SentencePiece-style BPE with byte fallback** (Llama 2, Mistral v0.1–v0.3, TinyLlama):
  ``tokenizer.ggml.model = "llama"``. llama.cpp's SentencePiece tokenizer merges the
  adjacent pair whose result has the highest score, where BPE applies the lowest-ranked
  merge; so a token made by merge ``k`` scores ``-k`` (single characters, bytes and
  special tokens 0), which makes the two agree. Byte tokens ``<0xXX>`` are typed BYTE.
  (gguf-py's ``LlamaHfVocab`` scores every token -1000, which would lose the order.)

The merges, the special-token ids (BOS/EOS/UNK/PAD), whether BOS/EOS are added, and the
chat template come from gguf-py's ``SpecialVocab``, which reads the same files; where no
file says whether BOS/EOS are added, the tokenizer's own encoding of a word says it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Split patterns (``tokenizer.json`` pre_tokenizer Split regexes) and llama.cpp's names.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
SPLIT_NAMES = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


class VocabularyError(ValueError):
    """The tokenizer is of a kind this writer does not translate (the message says which)."""


def _is_byte_level(step: dict, *, use_regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level ``tokenizer.json`` pre-tokenizer, or None.

    - ``ByteLevel`` with its own (GPT-2) regex: ``gpt-2``;
    - ``Digits(individual_digits)`` then ``ByteLevel``: ``smollm`` (SmolLM/SmolLM2,
      StarCoder's split: every digit alone, then GPT-2's regex);
    - a Qwen2 or Llama 3 ``Split`` regex then ``ByteLevel`` without a regex: ``qwen2``
      (Qwen2, Qwen2.5, Qwen3) or ``llama-bpe`` (Llama 3.x).
    """
    if not pre:
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is_byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if len(steps) != 2:
        return None
    first, second = steps
    if (first.get("type") == "Digits" and first.get("individual_digits")
            and _is_byte_level(second, use_regex=True)):
        return "smollm"
    if first.get("type") == "Split" and _is_byte_level(second, use_regex=False):
        return SPLIT_NAMES.get((first.get("pattern") or {}).get("Regex"))
    return None


def add_vocabulary(writer, model_dir: Path, n_vocab: int) -> dict:
    """Write ``model_dir``'s tokenizer into ``writer`` for an embedding of ``n_vocab`` rows.

    Returns ``{"tokenizer": "gpt2"|"llama", "pre": name or None, "warnings": [...]}``.

    Raises:
        VocabularyError: no ``tokenizer.json``, or a tokenizer of another kind (Unigram,
            WordPiece, BPE without byte-level or byte-fallback).
    """
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise VocabularyError(f"{model_dir}: no tokenizer.json; GGUF export needs the fast "
                              "tokenizer that transformers saves with the model")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    warnings: list[str] = []
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, scores, types, beyond = _sentencepiece_tokens(spec, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        kind, pre = "llama", None
    elif model.get("type") == "BPE" and spec.get("decoder", {}).get("type") == "ByteLevel":
        tokens, types, beyond = _byte_level_tokens(spec, n_vocab)
        pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            warnings.append(f"{path}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]}"
                            " is none llama.cpp is known to share; wrote tokenizer.ggml.pre="
                            "'default', so llama.cpp may split some text differently")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind = "gpt2"
    else:
        raise VocabularyError(
            f"{path}: a {model.get('type')} tokenizer cannot be written to GGUF yet; supported: "
            "byte-level BPE (GPT-2 style) and BPE with byte fallback (SentencePiece style)")
    if beyond:
        warnings.append(f"{path}: token(s) {', '.join(beyond)} have ids past the embedding's "
                        f"{n_vocab} rows; the model cannot read them, so they are left out")
    # SentencePiece-style vocabularies merge by score; byte-level BPE needs the merge list.
    special = gguf.SpecialVocab(Path(model_dir), load_merges=kind == "gpt2", n_vocab=n_vocab)
    # llama.cpp guesses add_bos per pre-tokenizer when the key is absent: always write what
    # the HF tokenizer does, read off its encoding of one word when no file states it.
    added = _adds_bos_eos(model_dir)
    for which in ("bos", "eos"):
        special.add_special_token.setdefault(which, added[which])
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": kind, "pre": pre, "warnings": warnings}


def _adds_bos_eos(model_dir: Path) -> dict[str, bool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("a")["input_ids"]
    return {"bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
            "eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}


def _tokens_by_id(spec: dict, n_vocab: int) -> tuple[dict, dict, list[str]]:
    """``({id: token}, {added id: CONTROL if special else USER_DEFINED}, tokens past the
    embedding)`` of a ``tokenizer.json`` (llama.cpp refuses a file with more tokens than
    embedding rows, so those are left out)."""
    import gguf

    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = (gguf.TokenType.CONTROL if added.get("special")
                              else gguf.TokenType.USER_DEFINED)
    return by_id, types, [repr(t) for i, t in sorted(by_id.items()) if i >= n_vocab]


def _byte_level_tokens(spec: dict, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings by id and their llama.cpp types for ids ``0 .. n_vocab - 1`` (holes
    padded), and the tokens whose ids lie past the embedding."""
    import gguf

    by_id, types, beyond = _tokens_by_id(spec, n_vocab)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    kinds = [types.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
             for i in range(n_vocab)]
    return tokens, kinds, beyond


def _sentencepiece_tokens(spec: dict, n_vocab: int) -> tuple[list, list, list, list]:
    """Tokens, scores (``-rank`` of the merge that makes each), types, and the tokens past
    the embedding, for a BPE ``tokenizer.json`` with byte fallback."""
    import gguf

    model = spec["model"]
    by_id, types, beyond = _tokens_by_id(spec, n_vocab)
    rank = {"".join(m.split(" ", 1) if isinstance(m, str) else m): k
            for k, m in enumerate(model.get("merges", []))}
    unk = model["vocab"].get(model.get("unk_token"), -1)
    tokens, scores, kinds = [], [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        scores.append(-float(rank[token]) if token in rank and i not in types else 0.0)
        kinds.append(types.get(i) or (
            gguf.TokenType.UNUSED if token is None else gguf.TokenType.UNKNOWN if i == unk
            else gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token)
            else gguf.TokenType.NORMAL))
    return tokens, scores, kinds, beyond


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a ``Prepend`` normalizer, or a
    ``Metaspace`` pre-tokenizer that prepends): llama.cpp's ``add_space_prefix``."""
    def steps(part: dict | None, key: str) -> list[dict]:
        if not part:
            return []
        return part.get(key, []) if part.get("type") == "Sequence" else [part]

    if any(s.get("type") == "Prepend" for s in steps(spec.get("normalizer"), "normalizers")):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
               for s in steps(spec.get("pre_tokenizer"), "pretokenizers"))
