"""GGUF export of a finished run, checked by two readers we did not write, and timed.

    pip install llama-cpp-python        # PyPI has only its sdist: builds llama.cpp, 5-10 min
    python benchmarks/gguf_llama_cpp.py runs/quickstart [--quants f32,f16,q8_0,q4_0]

For each quantization: the file's size; transformers' GGUF loader and llama.cpp (through
llama-cpp-python, f32 KV cache) on the run's own held-out examples (``build_splits`` with
the run's seed), against the merged HF model: max |Δ logit|, top-1 agreement, mean and max
|Δ log p| of the actual next tokens, perplexity; whether llama.cpp splits the held-out
text into the HF tokenizer's ids. Then the greedy reply to the run's held-out prompt
(summary.json) from ``leantune generate``'s code path (base + adapter, unmerged), from
the merged HF model and from llama.cpp (its default f16 KV cache): whether the replies
agree, and tokens/s over ``--speed-tokens`` forced tokens (prompt included), the arms
alternated over ``--rounds``. All use every core. Run it alone.
Results: ``--out`` (JSON, with the CPU model and flags) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
                + x.max(-1, keepdims=True))


def compare(ref: list[np.ndarray], got: list[np.ndarray], held: list[list[int]]) -> dict:
    """Logit and next-token log-prob agreement of ``got`` with ``ref`` (lists of [T, V])."""
    diffs, top1, dlp, nll_ref, nll_got = [], [], [], [], []
    for r, g, ids in zip(ref, got, held):
        diffs.append(np.abs(r - g).max())
        top1.append((r.argmax(-1) == g.argmax(-1)).mean())
        targets = np.asarray(ids[1:])
        lr = log_softmax(r[:-1])[np.arange(len(targets)), targets]
        lg = log_softmax(g[:-1])[np.arange(len(targets)), targets]
        dlp.append(np.abs(lr - lg))
        nll_ref.append(-lr)
        nll_got.append(-lg)
    dlp, nll_ref, nll_got = (np.concatenate(x) for x in (dlp, nll_ref, nll_got))
    return {"max_abs_dlogit": float(max(diffs)), "top1": float(np.mean(top1)),
            "mean_abs_dlogprob": float(dlp.mean()), "max_abs_dlogprob": float(dlp.max()),
            "ppl_ref": float(np.exp(nll_ref.mean())), "ppl": float(np.exp(nll_got.mean()))}


def hf_logits(model, held) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in held]


def llama_cpp_logits(llm, held) -> list[np.ndarray]:
    out = []
    for ids in held:
        llm.reset()
        llm.eval(ids)
        out.append(np.asarray(llm.scores[:len(ids)]).copy())
    return out


def llama_cpp_reply(llm, prompt_ids: list[int], max_new: int, eos: int | None):
    """Greedy ids (EOS included; ``eos=None`` runs to ``max_new``) and seconds, prompt
    processing included."""
    llm.reset()
    start, ids = time.perf_counter(), []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        ids.append(token)
        if token == eos or len(ids) == max_new:
            break
    return ids, time.perf_counter() - start


@torch.no_grad()
def hf_reply(model, tokenizer, prompt: str, max_new: int, to_the_end: bool = False):
    """What ``leantune generate`` runs for one prompt (leantune.model.generate.generate: greedy,
    KV cache, the rendered prompt without added special tokens): new ids and seconds;
    ``to_the_end`` forbids EOS until ``max_new`` tokens, for equal work in the timing."""
    start = time.perf_counter()
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new, use_cache=True, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id,
                         min_new_tokens=max_new if to_the_end else None)
    return out[0, enc["input_ids"].shape[1]:].tolist(), time.perf_counter() - start


def replies_and_speed(args, tmp: Path, run_model, merged, tokenizer, prompt: str, threads):
    """The greedy reply of every arm (to EOS, at most ``--max-new-tokens``), then
    ``--speed-tokens`` forced tokens per arm, the arms alternated over ``--rounds``."""
    import llama_cpp

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    hf = {"leantune generate (fp32, base + adapter)": run_model,
          "transformers generate (fp32, merged)": merged}
    cpp = {f"llama.cpp {q}": llama_cpp.Llama(str(tmp / q / f"model-{q}.gguf"), n_ctx=1024,
                                             n_threads=threads, verbose=False)
           for q in args.speed_quants.split(",")}
    replies = {k: hf_reply(m, tokenizer, prompt, args.max_new_tokens)[0] for k, m in hf.items()}
    replies |= {k: llama_cpp_reply(m, prompt_ids, args.max_new_tokens, tokenizer.eos_token_id)[0]
                for k, m in cpp.items()}
    speed = {k: [] for k in (*hf, *cpp)}
    n = args.speed_tokens
    for _ in range(args.rounds):  # alternate, so drift in the machine's speed hits all arms
        for k, m in hf.items():
            ids, seconds = hf_reply(m, tokenizer, prompt, n, to_the_end=True)
            speed[k].append(len(ids) / seconds)
        for k, m in cpp.items():
            ids, seconds = llama_cpp_reply(m, prompt_ids, n, None)
            speed[k].append(len(ids) / seconds)
    text = {k: tokenizer.decode(v, skip_special_tokens=True).strip() for k, v in replies.items()}
    return {"prompt_tokens": len(prompt_ids), "replies": text,
            "same_reply_as_leantune": {k: v == next(iter(text.values())) for k, v in text.items()},
            "speed_tokens": n, "tokens_per_s": {k: statistics.median(v) for k, v in speed.items()},
            "tokens_per_s_rounds": speed}


def lora_over_base(run_dir: Path, tmp: Path, ref, held, threads: int) -> dict | None:
    """``--format gguf-lora`` applied by llama.cpp over the run's own base GGUF (the
    quickstart's Q4_1 SmolLM2 file: GGUF in, GGUF out), against the merged model; and that
    base GGUF alone against the dequantized HF base, to show what the base's 4-bit
    arithmetic costs by itself. None when the run has no LoRA or no base GGUF."""
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from leantune.config import load_config
    from leantune.export import ExportError, export_gguf_lora
    from leantune.model.load import dequantize_gguf

    try:
        info = export_gguf_lora(run_dir, tmp / "lora-f32.gguf", "f32")
    except ExportError as e:
        print(f"gguf-lora: {e}")
        return None
    if info["base"] is None:
        return {"mib": info["bytes"] / 2**20, "base": None}
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    adapted = llama_cpp.Llama(info["base"], lora_path=info["out"], n_ctx=1024, logits_all=True,
                              n_threads=threads, verbose=False, **kv)
    with_lora = compare(ref, llama_cpp_logits(adapted, held), held)
    del adapted
    cfg = load_config(run_dir / "config.yaml").model
    base_dir = dequantize_gguf(cfg, str(Path(info["base"]).parent), Path(info["base"]).name)
    base_hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = llama_cpp.Llama(info["base"], n_ctx=1024, logits_all=True, n_threads=threads,
                            verbose=False, **kv)
    base_only = compare(hf_logits(base_hf, held), llama_cpp_logits(plain, held), held)
    return {"mib": info["bytes"] / 2**20, "base": info["base"], "with_lora": with_lora,
            "base_alone": base_only}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--quants", default="f32,f16,bf16,q8_0,q5_0,q4_1,q4_0")
    p.add_argument("--speed-quants", default="f16,q8_0,q4_1,q4_0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48, help="for the replies")
    p.add_argument("--speed-tokens", type=int, default=64, help="forced tokens per timing")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf.json")
    args = p.parse_args(argv)

    import llama_cpp
    from transformers import AutoModelForCausalLM

    from leantune.adapters.loading import load_for_generation
    from leantune.config import load_config
    from leantune.data.dataset import build_splits
    from leantune.export import export_gguf, export_run
    from leantune.model.precision import cpu_info

    cfg = load_config(args.run_dir / "config.yaml")
    summary = json.loads((args.run_dir / "summary.json").read_text())
    prompt = summary["samples"][0]["prompt"]
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    export_run(args.run_dir, tmp / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    run_model, tokenizer = load_for_generation(args.run_dir)
    run_model.eval()
    held = [e.input_ids for e in build_splits(cfg.data, tokenizer, cfg.train.seed).eval]
    ref = hf_logits(merged, held)
    texts = [tokenizer.decode(ids) for ids in held]
    rows = {}
    for quant in args.quants.split(","):
        start = time.perf_counter()
        info = export_gguf(args.run_dir, tmp / quant / f"model-{quant}.gguf", quant)
        row = {"mib": info["bytes"] / 2**20, "export_s": time.perf_counter() - start}
        reread = AutoModelForCausalLM.from_pretrained(tmp / quant, gguf_file=Path(info["out"]).name,
                                                      dtype=torch.float32)
        row["transformers"] = compare(ref, hf_logits(reread, held), held)
        del reread
        llm = llama_cpp.Llama(info["out"], n_ctx=1024, logits_all=True, n_threads=threads,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                              verbose=False)
        row["llama_cpp"] = compare(ref, llama_cpp_logits(llm, held), held)
        row["llama_cpp"]["same_ids"] = sum(
            llm.tokenize(t.encode(), add_bos=True, special=True) == tokenizer(t)["input_ids"]
            for t in texts) / len(texts)
        del llm
        rows[quant] = row
        print(f"{quant}: {json.dumps(row)}", flush=True)
    lora = lora_over_base(args.run_dir, tmp, ref, held, threads)
    generation = replies_and_speed(args, tmp, run_model, merged, tokenizer, prompt, threads)
    result = {
        "run_dir": str(args.run_dir), "cpu": cpu_info(), "threads": threads,
        "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "gguf")}
        | {"llama_cpp_python": llama_cpp.__version__},
        "held_out": {"examples": len(held), "tokens": sum(map(len, held))},
        "quants": rows, "lora_over_base": lora, "prompt": prompt, "generation": generation}
    shutil.rmtree(tmp, ignore_errors=True)  # ~1.5 GB of GGUF files
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def table(r: dict) -> str:
    lines = ["| quant | MiB | transformers: max abs Δlogit / top-1 | llama.cpp: max abs Δlogit / "
             "top-1 / mean abs Δlog p / ppl (HF ppl) | llama.cpp same ids |",
             "|---|---|---|---|---|"]
    for q, row in r["quants"].items():
        t, c = row["transformers"], row["llama_cpp"]
        lines.append(f"| {q} | {row['mib']:.1f} | {t['max_abs_dlogit']:.3g} / {t['top1']:.1%} | "
                     f"{c['max_abs_dlogit']:.3g} / {c['top1']:.1%} / "
                     f"{c['mean_abs_dlogprob']:.3g} / {c['ppl']:.3f} ({c['ppl_ref']:.3f}) | "
                     f"{c['same_ids']:.0%} |")
    g = r["generation"]
    base = next(iter(g["tokens_per_s"].values()))
    lines += ["", f"| reply by ({g['speed_tokens']} tokens after a {g['prompt_tokens']}-token "
              "prompt) | tokens/s | × leantune generate | same greedy reply |", "|---|---|---|---|"]
    for k, v in g["tokens_per_s"].items():
        lines.append(f"| {k} | {v:.1f} | {v / base:.2f} | "
                     f"{'yes' if g['same_reply_as_leantune'][k] else 'no'} |")
    lora = r.get("lora_over_base") or {}
    if lora.get("with_lora"):
        w, b = lora["with_lora"], lora["base_alone"]
        lines += ["", f"LoRA GGUF ({lora['mib']:.1f} MiB) over {Path(lora['base']).name} in "
                  f"llama.cpp vs the merged model: max abs Δlogit {w['max_abs_dlogit']:.3g}, "
                  f"top-1 {w['top1']:.1%}, mean abs Δlog p {w['mean_abs_dlogprob']:.3g}, ppl "
                  f"{w['ppl']:.3f} ({w['ppl_ref']:.3f}); that base alone vs its dequantized HF "
                  f"model: {b['max_abs_dlogit']:.3g}, {b['top1']:.1%}, "
                  f"{b['mean_abs_dlogprob']:.3g}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
