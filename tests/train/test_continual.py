"""Continual pre-training through the loop: corpus windows with replay and an eval per
corpus, a run continued from another's weights, a constant-phase checkpoint annealed,
new data picked up on resume, and a killed run resumed bit-identically mid-corpus."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.config import ConfigError, load_config
from leantune.report import write_report
from leantune.train.run_dir import RunDirError
from leantune.train.schedule import Schedule

from conftest import Crash, crash_after_checkpoint

WORDS = "the quick brown fox jumps over a lazy dog hello how are you today".split()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """``english``: 40 JSONL documents of words; ``code``: 30 .py files; ``code2``: other
    .py files (new data arriving later)."""
    root = tmp_path_factory.mktemp("corpora")
    rng = random.Random(0)
    with (root / "english.jsonl").open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS)
                                                 for _ in range(rng.randint(5, 40)))}) + "\n")
    for name, count in (("code", 30), ("code2", 12)):
        (root / name).mkdir()
        for i in range(count):
            body = "\n".join(f"def add{j}(a, b):\n    return a + b  # {rng.randint(0, 9)}"
                             for j in range(rng.randint(1, 6)))
            (root / name / f"m{i}.py").write_text(body)
    return {"english": str(root / "english.jsonl"), "code": str(root / "code"),
            "code2": str(root / "code2"), "cache": str(root / "cache")}


def config(model_dir, corpora, out, *overrides: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "data.mode=corpus", f"data.path={corpora['code']}",
        "data.glob=**/*.py", f"data.cache_dir={corpora['cache']}", "data.max_length=32",
        "data.eval_tokens=256", "data.eval_fraction=0.1", f"train.output_dir={out}",
        "train.batch_size=4", "train.progress=false", "adapter.method=full", "optim.lr=3e-3",
        *overrides])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, name="model") -> dict[str, torch.Tensor]:
    file = "model.safetensors" if name == "model" else "adapter_model.safetensors"
    return load_file(run_dir / name / file)


REPLAY = ["data.replay.ratio=0.25", "schedule.kind=cosine", "schedule.warmup_steps=2"]


def test_replay_run_reports_every_corpus(llama_dir, corpora, tmp_path):
    out = tmp_path / "run"
    summary = loop.train(config(llama_dir, corpora, out, f"data.replay.path={corpora['english']}",
                                *REPLAY, "train.max_steps=8", "train.grad_accum=2",
                                "eval.every=4"))
    # 8 steps x 8 windows, a quarter of them from the replayed corpus, exactly.
    assert summary["replay"]["windows"] == {"data": 48, "replay": 16}
    assert summary["replay"]["fraction"] == 0.25
    assert summary["train_tokens"]["total"] == 64 * 32 and summary["padding_fraction"] == 0
    table = summary["eval_sets"]
    assert {n: t["role"] for n, t in table.items()} == {"code": "data", "english": "replay"}
    assert table["code"]["after"]["loss"] < table["code"]["before"]["loss"] - 0.3
    assert summary["eval_loss"]["after"] == table["code"]["after"]["loss"]
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["tag"] for r in evals] == ["before", "periodic", "after"]
    assert all(set(r["eval_sets"]) == {"code", "english"} for r in evals)
    corpora_stats = summary["data"]["corpora"]
    assert corpora_stats["code"]["documents"] == 30 and corpora_stats["code"][
        "held_out_documents"] == 3  # eval_fraction 0.1 of 30 documents
    write_report([out])  # what `leantune train` does next
    assert all((out / "report" / f).is_file() for f in ("index.html", "lr.png", "eval_sets.png"))


def test_resume_mid_corpus_is_bit_identical(llama_dir, corpora, tmp_path, monkeypatch):
    """LoRA with dropout, replay at a rounding ratio, and Fast Forward on held-out
    documents: a run killed after step 3 and resumed ends where an unbroken one does."""
    overrides = [f"data.replay.path={corpora['english']}", "data.replay.ratio=0.3",
                 "adapter.method=lora", "adapter.dropout=0.1", "optim.lr=1e-2",
                 "train.max_steps=7", "checkpoint.every=3", "eval.every=2",
                 "fast_forward.enabled=true", "fast_forward.interval=2",
                 "fast_forward.eval_examples=3"]
    straight = loop.train(config(llama_dir, corpora, tmp_path / "a", *overrides))
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 3)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, corpora, tmp_path / "b", *overrides))
    resumed = loop.train(config(llama_dir, corpora, tmp_path / "b", *overrides,
                                "train.resume=true"))
    a, b = weights(tmp_path / "a", "adapter"), weights(tmp_path / "b", "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("replay", "eval_sets", "train_tokens", "ff_accepted_per_stage", "eval_loss"):
        assert resumed[key] == straight[key], key
    assert straight["ff_stages"] == 3 and straight["data"]["corpora"]["code"][
        "held_out_documents"] > 3  # the FF set's documents are held out too


def test_init_from_carries_the_weights_and_starts_schedule_and_data_over(llama_dir, corpora,
                                                                         tmp_path):
    first = tmp_path / "english"
    a = loop.train(config(llama_dir, corpora, first, f"data.path={corpora['english']}",
                          "data.glob=**/*", "train.max_steps=6"))
    overrides = [f"train.init_from={first}", f"data.replay.path={corpora['english']}", *REPLAY,
                 "train.max_steps=4"]
    b = loop.train(config(llama_dir, corpora, tmp_path / "code", *overrides))
    # The English held-out documents are the same in both runs (fixed by the corpus), and
    # the second run starts from the first one's final weights.
    assert b["eval_sets"]["english"]["before"] == a["eval_sets"]["english"]["after"]
    assert b["start"] == {"kind": "init", "checkpoint": str(first / "checkpoints" / "step-6"),
                          "new_data": None, "optimizer_reset": True}
    lrs = [r["lr"] for r in read_metrics(tmp_path / "code") if "lr" in r]
    assert lrs == pytest.approx([3e-3 * Schedule("cosine", 4, 2)(s) for s in range(4)])
    assert b["replay"]["windows"]["replay"] == 4  # 0.25 of 4 steps x 4 windows
    carried = loop.train(config(llama_dir, corpora, tmp_path / "carry", *overrides,
                                "optim.reset_on_new_data=false"))
    assert carried["start"]["optimizer_reset"] is False
    reset, kept = weights(tmp_path / "code"), weights(tmp_path / "carry")
    assert any(not torch.equal(reset[k], kept[k]) for k in reset)  # the moments mattered


def test_init_from_a_run_that_does_not_fit(llama_dir, corpora, tmp_path):
    first = tmp_path / "full"
    loop.train(config(llama_dir, corpora, first, "train.max_steps=1", "eval.before=false"))
    with pytest.raises(ConfigError, match="train.init_from: .* does not fit"):
        loop.train(config(llama_dir, corpora, tmp_path / "lora", f"train.init_from={first}",
                          "adapter.method=lora"))
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        loop.train(config(llama_dir, corpora, tmp_path / "x", f"train.init_from={tmp_path}"))


INFINITE = ["schedule.kind=infinite", "schedule.warmup_steps=2", "schedule.cooldown_steps=4",
            "schedule.decay_ratio=0", "schedule.const_lr_ratio=0.5",
            "schedule.min_lr_ratio=0.1", "checkpoint.every=4", "checkpoint.keep_last_n=5",
            "eval.before=false"]


def test_anneal_a_constant_phase_checkpoint(llama_dir, corpora, tmp_path):
    const_dir = tmp_path / "const"
    loop.train(config(llama_dir, corpora, const_dir, *INFINITE, "train.max_steps=12"))
    const = read_metrics(const_dir)
    assert [r["lr"] for r in const if "lr" in r][6:] == pytest.approx([1.5e-3] * 6)

    out = tmp_path / "anneal-8"
    summary = loop.train(config(llama_dir, corpora, out, *INFINITE, "schedule.decay_steps=4",
                                f"schedule.anneal_from={const_dir / 'checkpoints' / 'step-8'}"))
    annealed = read_metrics(out)
    train = [r for r in annealed if "lr" in r]
    assert [r["step"] for r in train] == [9, 10, 11, 12] and summary["optimizer_steps"] == 12
    # From the checkpoint's LR (0.5 x peak) down to 0.1 x peak, linearly over 4 steps.
    assert [r["lr"] for r in train] == pytest.approx([3e-3 * (0.1 + 0.4 * (1 - k / 4))
                                                      for k in range(4)])
    # Same weights and the same next windows as the constant run at step 9: same loss.
    assert train[0]["loss"] == next(r["loss"] for r in const if r.get("step") == 9)
    assert summary["start"]["kind"] == "anneal" and summary["schedule"]["anneal_at"] == 8

    log = (const_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="schedule.anneal_from: write the annealed run into "
                                          "another train.output_dir"):
        loop.train(config(llama_dir, corpora, const_dir, *INFINITE, "schedule.decay_steps=4",
                          f"schedule.anneal_from={const_dir}"))
    assert (const_dir / "metrics.jsonl").read_text() == log  # nothing touched
    # The constant-phase run itself goes on, still at its constant LR.
    more = loop.train(config(llama_dir, corpora, const_dir, *INFINITE, "train.max_steps=14",
                             "train.resume=true"))
    lrs = [r["lr"] for r in read_metrics(const_dir) if "lr" in r]
    assert len(lrs) == 14 and lrs[12:] == pytest.approx([1.5e-3, 1.5e-3])
    assert more["start"]["kind"] == "resume"


def test_resume_onto_new_data_reads_it_from_the_start(llama_dir, corpora, tmp_path):
    out = tmp_path / "run"
    loop.train(config(llama_dir, corpora, out, *INFINITE, "train.max_steps=4"))
    summary = loop.train(config(llama_dir, corpora, out, *INFINITE, "train.max_steps=6",
                                "train.resume=true", f"data.path={corpora['code2']}"))
    assert summary["start"]["new_data"] == ["data"] and summary["start"]["optimizer_reset"]
    # 2 steps x 4 windows of the new corpus, from the beginning of its first epoch.
    assert summary["replay"]["windows"] == {"data": 24}
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["streams"]["data"] == [0, 8] and state["data_keys"]["data"] == summary[
        "data"]["corpora"]["code2"]["key"]


def test_eval_corpora_beside_fine_tuning(llama_dir, corpora, tmp_path):
    """Examples mode (chat fine-tuning) watching a raw-text corpus for forgetting."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i} {i}"},
        {"role": "assistant", "content": f"{2 * i}"}]}) + "\n" for i in range(20)))
    summary = loop.train(load_config(None, [
        f"model.name_or_path={llama_dir}", f"data.path={chat}", "data.eval_fraction=0.2",
        f"data.eval_corpora={{prose: {corpora['english']}}}", f"data.cache_dir={corpora['cache']}",
        "data.eval_tokens=128", "data.max_length=64", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.progress=false"]))
    assert {n: t["role"] for n, t in summary["eval_sets"].items()} == {"chat": "data",
                                                                       "prose": "extra"}
    assert 128 <= summary["eval_sets"]["prose"]["tokens"] < 128 + 64  # chunks of <= 64
    assert summary["eval_sets"]["prose"]["after"]["loss"] > 0
    with pytest.raises(ConfigError, match="'chat' already names a held-out set"):
        loop.train(load_config(None, [
            f"model.name_or_path={llama_dir}", f"data.path={chat}",
            f"data.eval_corpora={{chat: {corpora['english']}}}",
            f"data.cache_dir={corpora['cache']}", f"train.output_dir={tmp_path / 'run2'}"]))


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3", "prompt_tuning", "loreft"])
def test_every_method_trains_on_a_corpus(method, llama_dir, corpora, tmp_path):
    summary = loop.train(config(llama_dir, corpora, tmp_path / "run", f"adapter.method={method}",
                                "optim.lr=null", "train.max_steps=3",
                                f"data.replay.path={corpora['english']}", "data.replay.ratio=0.25"))
    # Prompt tuning prepends tokens per row, so its windows go one document piece per row.
    assert summary["packing"]["used"] == ("none" if method == "prompt_tuning" else "online")
    assert summary["replay"]["windows"] == {"data": 9, "replay": 3}
    assert summary["eval_loss"]["after"] < summary["eval_loss"]["before"]


@pytest.mark.parametrize("kind", ["cosine", "wsd", "infinite"])
def test_every_schedule_family_on_a_corpus_with_replay(kind, llama_dir, corpora, tmp_path):
    out = tmp_path / "run"
    cfg = config(llama_dir, corpora, out, f"schedule.kind={kind}", "schedule.warmup_steps=2",
                 "schedule.decay_steps=3", "schedule.cooldown_steps=2",
                 "schedule.min_lr_ratio=0.1", f"data.replay.path={corpora['english']}",
                 "data.replay.ratio=0.05", "train.max_steps=10", "eval.before=false")
    summary = loop.train(cfg)
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    want = Schedule(kind, 10, 2, 0.1, decay=3, cooldown=2)  # const_ratio: the default 0.5
    assert lrs == pytest.approx([3e-3 * want(s) for s in range(10)])
    assert summary["replay"]["windows"]["replay"] == 2  # 0.05 x 40 windows, carried over
