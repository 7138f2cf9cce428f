"""``leantune bench continual``: continual pre-training with replay, at small scale.

The claim (Ibrahim et al. 2024, arXiv 2403.08763): moving a pretrained model from corpus
A to a shifted corpus B, re-warming and re-decaying the LR, and replaying a fraction of
A in every batch (compute-equivalent: B's share shrinks) cuts the forgetting of A at
little cost on B, and approaches retraining on the union of A and B at a fraction of its
compute.

Here, on 2 CPU cores: a small Llama is pretrained from scratch on A (English chat text:
ShareGPT conversations from the embedded default), then continued on B (Python source
of the standard library) from that checkpoint once per replay fraction, with the same
steps, tokens and schedule; the union baseline trains from scratch on A and B mixed, for
the steps of both stages together. Every run reports the loss on held-out documents of A
and of B at every eval. Every run is a ``leantune train`` process, so this measures the
shipped pipeline: corpus shards, windows, replay, ``train.init_from``, eval per corpus.

The model trains its own byte-level BPE tokenizer (8,192 tokens, on equal samples of A
and B) rather than using SmolLM2's 49,152-token one: the output layer would otherwise
cost most of the compute, and the runs would see ~6x fewer tokens in the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from leantune.data.corpus import iter_documents

MODEL = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4}


def stdlib_python() -> Iterator[str]:
    """Python's standard library sources, one document per file (tests and site-packages
    left out; the few files that are deliberately not UTF-8 too)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & {"site-packages", "test", "tests", "idle_test"}:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


def write_documents(texts: Iterable[str], out: Path, max_chars: int) -> int:
    """The first non-empty ``texts`` up to ``max_chars`` characters, as JSONL ``{"text"}``
    rows in ``out``; returns how many."""
    n, chars = 0, 0
    with out.open("w") as f:
        for text in texts:
            if not text.strip():
                continue
            f.write(json.dumps({"text": text}) + "\n")
            n, chars = n + 1, chars + len(text)
            if chars >= max_chars:
                break
    return n


def make_model(corpora: list[Path], out: Path, vocab: int, seed: int = 0) -> Path:
    """A random-init Llama (:data:`MODEL`) with a byte-level BPE tokenizer trained on equal
    samples of each corpus, saved as an HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    def sample(path: Path, chars: int = 2_000_000):
        total = 0
        for line in path.open():
            text = json.loads(line)["text"]
            yield text
            total += len(text)
            if total >= chars:
                return

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((t for c in corpora for t in sample(c)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, bos_token_id=None, **MODEL)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def train_run(name: str, overrides: list[str], out: Path) -> dict:
    """One ``leantune train`` process writing into ``out``; its summary and eval history."""
    cmd = [sys.executable, "-m", "leantune", "train", *overrides, f"train.output_dir={out}"]
    tick = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"name": name, "seconds": time.perf_counter() - tick,
            "optimizer_steps": summary["optimizer_steps"],
            "train_tokens": summary["train_tokens"]["total"],
            "train_flops": summary["train_flops"],
            "tokens_per_second": summary["tokens_per_second"],
            "replay": summary.get("replay"), "start": summary["start"],
            "eval_sets": summary["eval_sets"],
            "history": [{"step": r["step"], **{k: v["loss"] for k, v in r["eval_sets"].items()}}
                        for r in summary["eval_history"]]}


def bench_continual(corpus_a: str = "embedded:sharegpt", corpus_b: str = "stdlib",
                    steps_a: int = 200, steps_b: int = 200, ratios: tuple[float, ...] = (
                        0.0, 0.05, 0.25), union: bool = True, batch_size: int = 16,
                    max_length: int = 256, lr: float = 2e-3, eval_every: int = 40,
                    eval_tokens: int = 16384, vocab: int = 8192, work: Path | None = None,
                    out: Path | None = None, plot: Path | None = None) -> dict:
    """Pretrain on A, continue on B at each replay ratio, and the union baseline.

    Returns:
        ``{"setup", "runs": {name: figures}, "table": [...]}``, written to ``out`` after
        every run (a crash keeps what finished).
    """
    setup = {k: v for k, v in locals().items() if k not in ("work", "out", "plot")} | {
        "ratios": list(ratios)}
    results = {"setup": setup | {"model": MODEL}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="leantune-bench-continual-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # Enough text that no stage repeats a window: ~4 characters per token.
        chars = 5 * max(steps_a, steps_b) * batch_size * max_length
        a, b = work / "english.jsonl", work / "python.jsonl"
        setup["documents"] = {
            "A": write_documents(iter_documents(corpus_a, on_bad=lambda e: None), a, chars),
            "B": write_documents(stdlib_python() if corpus_b == "stdlib" else
                                 iter_documents(corpus_b, on_bad=lambda e: None), b, chars)}
        model = make_model([a, b], work / "base", vocab)
        common = [f"model.name_or_path={model}", "data.mode=corpus", "adapter.method=full",
                  f"data.max_length={max_length}", f"data.eval_tokens={eval_tokens}",
                  f"data.cache_dir={work / 'cache'}", f"train.batch_size={batch_size}",
                  f"optim.lr={lr}", "optim.weight_decay=0.1", "schedule.kind=cosine",
                  "schedule.warmup_ratio=0.05", "schedule.min_lr_ratio=0.1",
                  f"eval.every={eval_every}", "train.progress=false", "checkpoint.every=null"]

        def record(name: str, overrides: list[str]) -> None:
            results["runs"][name] = train_run(name, common + overrides, work / slug(name))
            results["table"] = table_rows(results)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))

        # Pretraining on A, evaluated on B too (its starting point on B).
        record("pretrain A", [f"data.path={a}", f"data.eval_corpora={{python: {b}}}",
                              f"train.max_steps={steps_a}"])
        for ratio in ratios:
            record(f"A -> B, replay {ratio:.0%}", [
                f"data.path={b}", f"data.replay.path={a}", f"data.replay.ratio={ratio}",
                f"train.init_from={work / slug('pretrain A')}", f"train.max_steps={steps_b}"])
        if union:  # from scratch on A and B mixed in proportion, for both stages' steps
            record("union A+B (from scratch)", [
                f"data.path={b}", f"data.replay.path={a}",
                f"data.replay.ratio={steps_a / (steps_a + steps_b)}",
                f"train.max_steps={steps_a + steps_b}"])
        if plot is not None:
            plot_runs(results, plot)
    return results


def slug(name: str) -> str:
    """A run's directory name: ``"A -> B, replay 5%"`` -> ``"a-b-replay-5"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _loss(run: dict, corpus: str, when: str) -> float | None:
    cell = run["eval_sets"].get(corpus, {}).get(when)
    return cell and cell["loss"]


def table_rows(results: dict) -> list[dict]:
    """Per run: loss on A and B after it, forgetting of A (vs the pretrained model), and
    the training compute it took (tokens, FLOPs) counting the pretraining it started from."""
    runs = results["runs"]
    base = runs.get("pretrain A")
    a_pre = base and _loss(base, "english", "after")
    rows = []
    for name, r in runs.items():
        inherited = base if r["start"]["kind"] == "init" and base else None
        tokens = r["train_tokens"] + (inherited["train_tokens"] if inherited else 0)
        flops = r["train_flops"] + (inherited["train_flops"] if inherited else 0)
        loss_a, loss_b = _loss(r, "english", "after"), _loss(r, "python", "after")
        rows.append({"run": name, "loss_A": loss_a, "loss_B": loss_b,
                     "forgetting_A": loss_a - a_pre if inherited and a_pre else None,
                     "replay_fraction": r["replay"]["fraction"] if r["replay"]["path"] else None,
                     "tokens_total": tokens, "flops_total": flops,
                     "seconds": r["seconds"]})
    return rows


def format_table(results: dict) -> str:
    """The Markdown table of BENCHMARKS.md."""
    def f(x, spec=".4f"):
        return "–" if x is None else format(x, spec)

    lines = ["| run | loss on A (English) | loss on B (Python) | forgetting of A | replayed | "
             "training tokens (incl. pretraining) | seconds |", "|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        forget = "–" if row["forgetting_A"] is None else f"{row['forgetting_A']:+.4f}"
        lines.append(f"| {row['run']} | {f(row['loss_A'])} | {f(row['loss_B'])} | {forget} | "
                     f"{f(row['replay_fraction'], '.1%')} | {row['tokens_total']:,} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def plot_runs(results: dict, path: Path) -> None:
    """Held-out loss on A and on B against training tokens, every run; the continued runs
    are drawn after the pretraining tokens they start from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    tokens_per_step = results["setup"]["batch_size"] * results["setup"]["max_length"]
    offset = runs["pretrain A"]["optimizer_steps"] if "pretrain A" in runs else 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for (corpus, title), ax in zip((("english", "A: English chat (ShareGPT)"),
                                    ("python", "B: Python stdlib source")), axes):
        for name, r in runs.items():
            shift = offset if r["start"]["kind"] == "init" else 0
            points = [((h["step"] + shift) * tokens_per_step / 1e6, h[corpus])
                      for h in r["history"] if corpus in h]
            style = "--" if name.startswith("union") else "-"
            ax.plot(*zip(*points), style, marker=".", ms=4, label=name)
        ax.set(title=f"held-out loss on {title}", xlabel="training tokens (M)",
               ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
