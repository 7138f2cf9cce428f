"""Packing on every causal-LM architecture transformers knows, as a new user would meet it.

    python benchmarks/packing_architectures.py [--only llama,phi3] [--max-length 128]

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built
from the config class's defaults with its sizes shrunk (hidden 64, 2-4 layers, 4 heads,
vocab 512, 4 experts; a type whose config will not shrink or whose model will not build is
listed as ``not built`` with the reason). Then, in fp32 on the sdpa backend (eager where
sdpa is not supported):

1. **LoRA with the default targets** (``adapter.method=lora``): wraps and runs, or is
   refused in one line (leantune's ``ConfigError``); anything else is a traceback.
2. **leantune's decision**: :func:`~leantune.train.probe.resolve_packing` on a first
   micro-batch laid out as training lays it out (8 examples of 6-120 random tokens,
   ``pack_batch`` into rows of at most ``max_length``) plus its full-width rows.
3. **An independent check** that does not use the probe's code: three harder batches
   (a pad tail longer than every example; rows of exactly ``max_length`` with many short
   examples; one example per row but for a last, two-example row), each run padded (one
   example per row, attention mask, straight through the model) and packed (leantune's
   collator), comparing every example's summed loss and the gradients of all weights.

Verdicts: ``exact`` (the probe passes and the check agrees), ``fell back`` (the probe or
the config check chose padding; the check says whether packing really was inexact),
``SILENT`` (the probe passed but the check found contamination: a bug), ``not causal``
(leantune refuses the model at load). Results go to
``benchmarks/results/packing_architectures.json`` (``--out``) with the CPU and versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig, ConfigError
from leantune.data.batching import pack_batch
from leantune.data.collate import collate_packed, collate_padded
from leantune.data.encode import IGNORE, Encoded
from leantune.bench.common import cpu_info
from leantune.model import first_line as first_line_of, future_leak, leak_tolerance
from leantune.train.probe import probe_batches, resolve_packing

SIZES = {  # config key -> tiny value, set when the config has the key
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "intermediate_size_mlp": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "n_layer": 2,
    "num_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_head": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 512,
    "n_positions": 512, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
    "moe_num_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 16,
    "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8,
    "mamba_n_heads": 4, "mamba_d_head": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 24, "attention_chunk_size": 48,
    "rotary_dim": 8, "mamba_expand": 2, "d_head": 16,
}
# What some config validators insist on beyond SIZES: model type -> changes.
FIXES = {
    "mamba2": {"head_dim": 32}, "bamba": {"mamba_d_head": 32}, "falcon_h1": {"mamba_d_head": 32},
    "granitemoehybrid": {"mamba_d_head": 32}, "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "zaya": {"num_experts_per_tok": 1}, "reformer": {
        "is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 32],
        "attn_layers": ["local", "local"]},
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


# Configs of real checkpoints whose defaults hide a packing trap: name -> (type, changes).
VARIANTS = {
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


def tiny_config(model_type: str, changes: dict | None = None):
    """The config class's defaults with :data:`SIZES` (and ``changes``) applied (to the
    text config of a composite one) and per-layer lists cut to the new layer count."""
    defaults = AutoConfig.for_model(model_type)
    text = defaults.get_text_config()
    base = text.to_dict()
    over = {k: v for k, v in SIZES.items() if k in base}
    if "qk_rope_head_dim" in base:  # multi-head latent attention: head dims derived
        over |= {k: v for k, v in (("head_dim", SIZES["qk_rope_head_dim"]), ("qk_head_dim", (
            SIZES["qk_rope_head_dim"] + SIZES["qk_nope_head_dim"]))) if k in base}
        over["num_key_value_heads"] = SIZES["num_attention_heads"]  # latent KV: no grouping
    over |= FIXES.get(model_type, {}) | (changes or {})
    full = next((base[k] for k in LAYER_KEYS if isinstance(base.get(k), int)), None)
    layers = next((over[k] for k in LAYER_KEYS if k in over), None)
    for key, value in base.items():  # per-layer lists: keep each kind once, cut the rest
        if layers and full and isinstance(value, list) and len(value) == full > layers:
            kinds = list(dict.fromkeys(map(str, value)))
            n = max(layers, len(kinds)) if len(kinds) <= 4 else layers
            cut = value[:n]
            for k in kinds[:n]:  # every kind the full model has, at least once
                if k not in map(str, cut):
                    cut[-1 - kinds.index(k) % n] = value[list(map(str, value)).index(k)]
            over[key] = cut
            for k in LAYER_KEYS:
                if k in over:
                    over[k] = layers = n
        elif (layers and full and isinstance(value, list) and value and len(value) < full
              and all(isinstance(v, int) and 0 <= v < full for v in value)
              and ("idx" in key or "indices" in key)):
            over[key] = [layers - 1]  # indices of layers of one kind: the last one, so the
            #                           first layer keeps the other kind
        elif layers and isinstance(value, dict) and value and all(
                isinstance(k, int) or str(k).isdigit() for k in value):
            over[key] = {k: v for k, v in value.items() if int(k) < layers}
    if text is defaults:
        return type(defaults)(**{**base, **over})
    return type(text)(**{**base, **over})


def examples(vocab: int, lengths: list[int], seed: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def loss_by_example(model, batch, spans) -> tuple[list[float], list[torch.Tensor]]:
    """Each example's summed target loss (by (row, offset, length) spans) and the gradient
    of their sum with respect to every trainable weight."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, -1)
    losses = []
    for r, o, n in spans:
        labels = batch["labels"][r, o + 1:o + n]
        keep = labels != IGNORE
        tok = logp[r, o:o + n - 1].gather(-1, labels.clamp_min(0)[:, None])[:, 0]
        losses.append(-(tok * keep).sum())
    total = torch.stack(losses).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    if total.grad_fn is None:  # an eval-mode forward without a graph (Reformer)
        return [float(x.detach()) for x in losses], []
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [float(x.detach()) for x in losses], [g for g in grads if g is not None]


def independent_check(model, vocab: int, max_length: int) -> dict:
    """Worst relative differences, padded vs packed, over three hard layouts."""
    hard = [  # (lengths, bins)
        ([40, 40, 40, 6], [[0, 1, 2], [3]]),                       # pad tail 114 > 40
        ([max_length // 8] * 16, [list(range(8)), list(range(8, 16))]),  # full rows, 8 each
        ([max_length - 20, max_length - 30, 11, 9], [[0], [1], [2, 3]]),
    ]
    worst_loss, worst_grad, finite = 0.0, 0.0, True
    for k, (lengths, bins) in enumerate(hard):
        ex = examples(vocab, lengths, seed=100 + k)
        padded = collate_padded(ex, pad_id=0)
        ref, g_ref = loss_by_example(model, padded, [(i, 0, n) for i, n in enumerate(lengths)])
        packed = collate_packed(ex, bins, pad_id=0)
        spans = {}
        for r, b in enumerate(bins):
            o = 0
            for i in b:
                spans[i] = (r, o, lengths[i])
                o += lengths[i]
        got, g_got = loss_by_example(model, packed, [spans[i] for i in range(len(ex))])
        finite &= all(torch.isfinite(torch.tensor(got))) and all(g.isfinite().all() for g in g_got)
        worst_loss = max(worst_loss, max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(got, ref)))
        num = sum(float((a - b).double().square().sum()) for a, b in zip(g_got, g_ref))
        den = sum(float(b.double().square().sum()) for b in g_ref)
        worst_grad = max(worst_grad, (num / den) ** 0.5 if den else 0.0)
    return {"loss": worst_loss, "grads": worst_grad, "finite": bool(finite),
            "exact": bool(finite) and worst_loss < 1e-4 and worst_grad < 1e-3}


class Timeout(Exception):
    pass


def check(model_type: str, max_length: int, changes: dict | None = None) -> dict:
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, changes),
                                                 attn_implementation="sdpa")
    except (ValueError, ImportError):  # no sdpa: the model's own default
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, changes))
    model.config.use_cache = False
    model.eval()  # no dropout: both layouts must compute the same function
    vocab = model.config.get_text_config().vocab_size
    out = {"class": type(model).__name__, "attn": model.config._attn_implementation}
    if future_leak(model) > leak_tolerance(model):
        return out | {"verdict": "not causal"}
    try:  # LoRA with the default targets, as `adapter.method=lora` does
        adapter = build_adapter(AdapterConfig(method="lora", dropout=0.0))
        lora = adapter.apply(model)
        out["lora"] = "ok"
        with torch.no_grad():  # a trained adapter is not the identity: B = 0 hides a lot
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model = lora
    except ConfigError as e:
        out["lora"] = f"refused: {e}"
        adapter = build_adapter(AdapterConfig(method="full"))
    except Exception as e:  # noqa: BLE001 - a traceback is what this looks for
        out["lora"] = f"TRACEBACK: {type(e).__name__}: {first_line_of(e)}"
        adapter = build_adapter(AdapterConfig(method="full"))
    lengths = [100, 37, 64, 12, 90, 23, 51, 8]
    first = examples(vocab, lengths, seed=1)
    bins = pack_batch(lengths, max_length)
    rows = [[first[i] for i in b] for b in bins]
    decision = resolve_packing("online", model, adapter, probe_batches(rows, max_length), 0,
                               max_length)
    out |= {"used": decision["used"], "reason": decision["reason"],
            "probe": decision["probe"] and {k: decision["probe"][k]
                                            for k in ("errors", "finite", "seconds")}}
    truth = independent_check(model, vocab, max_length)
    out["check"] = truth
    if decision["used"] == "none":
        out["verdict"] = "fell back"
    else:
        out["verdict"] = "exact" if truth["exact"] else "SILENT"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    parser.add_argument("--out", default="benchmarks/results/packing_architectures.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    kinds = {k: (k, None) for k in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} | VARIANTS
    if args.only:
        kinds = {k: kinds.get(k, (k, None)) for k in args.only.split(",")}

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    results = {}
    for kind, (model_type, changes) in kinds.items():
        tick = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            r = check(model_type, args.max_length, changes)
        except Timeout:
            r = {"verdict": "not built", "why": f"over {args.timeout} s"}
        except Exception as e:  # noqa: BLE001 - a model that will not build is listed
            where = traceback.extract_tb(e.__traceback__)[-1]
            r = {"verdict": "not built", "why": f"{type(e).__name__}: {first_line_of(e)[:200]} "
                                                 f"({Path(where.filename).name}:{where.lineno})"}
        finally:
            signal.alarm(0)
        r["seconds"] = round(time.perf_counter() - tick, 2)
        results[kind] = r
        print(f"{kind:28s} {r['verdict']:10s} {r.get('lora', '')[:60]:60s} "
              f"{(r.get('reason') or r.get('why') or '')[:120]}", flush=True)
    counts = {}
    for r in results.values():
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(counts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": " ".join(sys.argv), "cpu": cpu_info(), "torch": torch.__version__,
        "transformers": transformers.__version__, "max_length": args.max_length,
        "counts": counts, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
