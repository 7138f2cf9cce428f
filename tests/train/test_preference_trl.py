"""Whole training steps against TRL's trainers, an implementation we did not write: the same
pairs, the same LoRA start, the same AdamW; TRL's per-step loss and ``rewards/*`` equal
leantune's, for padded pairs and for packed pairs with their prompt shared.

Each step takes the whole (8-pair) set as one batch, so TRL's sampler order cannot matter.
The LoRA start is shared by loading one saved initial adapter into both.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import set_peft_model_state_dict

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig, load_config

from conftest import save_tiny_model

trl = pytest.importorskip("trl")

PAIRS = 8
STEPS = 3
PAIR_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
LORA = AdapterConfig(method="lora", r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")


def rows() -> list[dict]:
    """Pairs whose chosen completions all have the same length (ORPO's NLL then averages
    the same way in both: per pair here, per batch token in TRL)."""
    out = []
    for i in range(PAIRS):
        a, b = i % 5, (2 * i + 1) % 7
        out.append({"prompt": f"Question {i}: add {a} and {b}. Answer:" + " please" * (i % 3),
                    "chosen": f" {a + b + 10}", "rejected": f" {a + b + 13}" + " no" * (i % 2)})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base, the pairs file, and a LoRA start (B = 0, PEFT's init: TRL's reference
    for a model that comes with an adapter is a copy of that adapter, which is then the
    base, as leantune's adapter-off reference is)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trl_pairs")
    base = save_tiny_model(root / "base", "llama")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    torch.manual_seed(5)
    model = build_adapter(LORA).apply(AutoModelForCausalLM.from_pretrained(base))
    start = root / "start"
    model.save_pretrained(start)
    return base, data, start


def load_start(model, start) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(start / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    assert not result.unexpected_keys


def unpaired(data, tmp_path):
    """The pairs as KTO's rows, in file order: chosen desirable, rejected not, alternating
    so that every batch holds both."""
    out = tmp_path / "unpaired.jsonl"
    records = [json.loads(line) for line in open(data)]
    rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for i, r in enumerate(records) for key in (("chosen",) if i % 2 else ("rejected",))]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def trl_history(kind: str, base: str, data, start, tmp_path, **knobs) -> list[dict]:
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), start,
                                      is_trainable=True)
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                  max_length=256, seed=0, max_grad_norm=1.0, weight_decay=0.0,
                  optim="adamw_torch")
    dataset = Dataset.from_list([json.loads(line) for line in open(data)])
    try:
        if kind in ("dpo", "ipo"):
            args = trl.DPOConfig(loss_type=["sigmoid" if kind == "dpo" else "ipo"],
                                 beta=0.1, **common)
            trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset,
                                     processing_class=tokenizer)
        elif kind == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            # CPO/ORPO put a BOS before every prompt where the tokenizer has one; ours (and
            # TRL's DPOTrainer) tokenize as the tokenizer does, which adds none here
            tokenizer.bos_token = None
            args = CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0,
                             **common)
            trainer = CPOTrainer(model=model, args=args, train_dataset=dataset,
                                 processing_class=tokenizer)
        elif kind == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            tokenizer.bos_token = None  # as for CPO
            args = ORPOConfig(beta=0.1, **common)
            trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
        elif kind == "kto":
            args = trl.KTOConfig(beta=0.1, **common)
            trainer = trl.KTOTrainer(model=model, args=args, train_dataset=dataset,
                                     processing_class=tokenizer)
        trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return [h for h in trainer.state.log_history if "loss" in h]


def trls_mismatch(data, base):
    """TRL's KL completions in place of leantune's seeded ones: each example of a batch (the
    whole file here) takes the previous example's completion."""
    from transformers import AutoTokenizer

    from leantune.data.preference import PreferenceStats, encode_preference, to_preference
    from leantune.data.rows import Row

    tokenizer = AutoTokenizer.from_pretrained(base)
    items = [encode_preference(to_preference(Row("f", str(i), json.loads(line)), "unpaired"),
                               tokenizer, 256, PreferenceStats())
             for i, line in enumerate(open(data))]
    previous = {(tuple(x.prompt), tuple(x.chosen)): items[i - 1].chosen
                for i, x in enumerate(items)}

    def mismatch(found, seed, max_length):
        for x in found:
            x.rejected = previous[tuple(x.prompt), tuple(x.chosen)][:max_length - len(x.prompt)]

    return mismatch


def ours(kind: str, base: str, data, start, run_dir, packing: str, monkeypatch) -> list[dict]:
    import leantune.data.preference_sets as sets
    import leantune.train.loop as loop

    real = loop.build_run
    if kind == "kto":
        monkeypatch.setattr(sets, "mismatch", trls_mismatch(data, base))

    def from_start(cfg):
        run = real(cfg)
        load_start(run.acc.unwrap_model(run.model), start)
        return run

    monkeypatch.setattr(loop, "build_run", from_start)
    loop.train(load_config(None, [
        f"model.name_or_path={base}", f"data.path={data}", f"train.output_dir={run_dir}",
        f"objective.kind={kind}", f"objective.beta={2.0 if kind == 'simpo' else 0.1}",
        f"data.packing={packing}",
        f"train.batch_size={PAIRS}", f"train.max_steps={STEPS}", "optim.lr=1e-2",
        "schedule.kind=constant", "data.eval_fraction=0", "eval.before=false",
        "train.progress=false", "eval.generate=0", "data.max_length=256",
        "adapter.r=4", "adapter.alpha=8", "adapter.dropout=0", "adapter.target_modules=all-linear"]))
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("packing", ["none", "online"])
def test_steps_equal_trls_dpo_trainer(kind, packing, setup, tmp_path, monkeypatch):
    base, data, start = setup
    theirs = trl_history(kind, base, data, start, tmp_path)
    mine = ours(kind, base, data, start, tmp_path / "run", packing, monkeypatch)
    assert len(theirs) == len(mine) == STEPS
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    want = "padded" if packing == "none" else "packed+shared_prompt"
    assert summary["objective"]["layout"]["layout"] == want
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"]
    for step, (t, m) in enumerate(zip(theirs, mine)):
        assert m["loss"] == pytest.approx(t["loss"], rel=1e-4, abs=1e-5), step
        for key in keys:
            assert m[key] == pytest.approx(t[key], rel=1e-4, abs=1e-4), (step, key)
    # the steps moved the model: later losses differ from the first
    assert abs(mine[-1]["loss"] - mine[0]["loss"]) > 1e-3


@pytest.mark.parametrize("packing", ["none", "online"])
def test_steps_equal_trls_kto_trainer(packing, setup, tmp_path, monkeypatch):
    base, pairs, start = setup
    data = unpaired(pairs, tmp_path)
    theirs = trl_history("kto", base, data, start, tmp_path)
    mine = ours("kto", base, data, start, tmp_path / "run", packing, monkeypatch)
    assert len(theirs) == len(mine) == STEPS
    for step, (t, m) in enumerate(zip(theirs, mine)):
        assert m["loss"] == pytest.approx(t["loss"], rel=1e-4, abs=1e-5), step
        for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            assert m[key] == pytest.approx(t[key], rel=1e-4, abs=1e-4), (step, key)
    assert abs(mine[-1]["loss"] - mine[0]["loss"]) > 1e-4


def test_simpo_steps_equal_trls_cpo_trainer(setup, tmp_path, monkeypatch):
    """SimPO is TRL's CPOTrainer with loss_type simpo and no NLL term (cpo_alpha 0)."""
    pytest.importorskip("trl.experimental")
    base, data, start = setup
    theirs = trl_history("simpo", base, data, start, tmp_path)
    mine = ours("simpo", base, data, start, tmp_path / "run", "online", monkeypatch)
    assert len(theirs) == len(mine) == STEPS
    for step, (t, m) in enumerate(zip(theirs, mine)):
        assert m["loss"] == pytest.approx(t["loss"], rel=1e-4, abs=1e-5), step
        for key in PAIR_KEYS:
            assert m[key] == pytest.approx(t[key], rel=1e-4, abs=1e-4), (step, key)
    assert abs(mine[-1]["loss"] - mine[0]["loss"]) > 1e-3


def test_orpos_odds_ratio_term_equals_trls_orpo_trainer(setup, tmp_path, monkeypatch):
    """TRL's ORPOTrainer takes its NLL term over prompt and completion; leantune over the
    completion, as SFT (and the ORPO paper's L_SFT) does. The odds-ratio term, the
    log-probs and rewards agree at the first step; later steps part with the NLL term."""
    pytest.importorskip("trl.experimental")
    base, data, start = setup
    t = trl_history("orpo", base, data, start, tmp_path)[0]
    m = ours("orpo", base, data, start, tmp_path / "run", "online", monkeypatch)[0]
    assert m["loss"] - m["nll_loss"] == pytest.approx(t["loss"] - t["nll_loss"], rel=1e-4)
    for key in PAIR_KEYS + ["log_odds_ratio"]:
        assert m[key] == pytest.approx(t[key], rel=1e-4, abs=1e-4), key
    assert m["nll_loss"] == pytest.approx(-m["logps/chosen"], rel=1e-6)  # completion only
    assert t["nll_loss"] != pytest.approx(m["nll_loss"], rel=1e-3)
