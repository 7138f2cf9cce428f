"""``leantune eval``: the loss equals an independent per-example computation and the
loss the run itself logged; every method is scored; match accuracy counts what it says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import leantune.adapters.loading as serve
import leantune.model.generate as generation
from leantune.cli import main
from leantune.config import DataConfig, ModelConfig
from leantune.data.dataset import DataStats, encode_all, load_examples
from leantune.data.sources import DataError
from leantune.data.tasks import ChoiceDoc
from leantune.eval.sets import evaluate_target, extract_answer, match_scores, normalize
from leantune.model.load import load_tokenizer

from helpers import write_rows

METHODS = ["lora", "dora", "qlora", "ia3", "prompt_tuning", "full", "loreft", "direft"]
SETTINGS = {"dora": ["adapter.method=lora", "adapter.use_dora=true"]}


def test_normalize_and_match_scores():
    assert normalize("  The Answer is  7.\n") == "the answer is 7"
    scores = match_scores(["The answer is 7.", "It is 7, I think", "8"],
                          ["the answer is 7", "7", "7"])
    assert scores == {"generated": 3, "exact_match": 1 / 3, "contains_match": 2 / 3,
                      "answer_match": 0.0}  # "the answer is 7" extracts to "7"
    assert match_scores([], []) == {"generated": 0, "exact_match": None, "contains_match": None,
                                    "answer_match": None}
    # Answer extraction: the first line, after an answer lead-in.
    assert extract_answer("\nThe correct answer is: Paris.\nBecause it is.") == "paris"
    assert extract_answer("Answer: true") == "true" and extract_answer("7 apples") == "7 apples"
    got = match_scores(["The answer is 7.\nIt is.", "answer: 8", "7 or 8"], ["7", "7", "7"])
    assert (got["answer_match"], got["exact_match"], got["contains_match"]) == (1 / 3, 0, 2 / 3)


def test_loss_equals_each_example_scored_alone(llama_dir, tmp_path):
    """Packed eval vs. a per-example, unpadded forward: sum of target-token losses over
    all examples / number of target tokens."""
    data = write_rows(tmp_path / "d.jsonl", 0, 12)
    got = evaluate_target(Path(llama_dir), [data], generate_n=0)["datasets"]["d"]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=llama_dir))
    examples, _ = load_examples(data, DataConfig(), True, DataStats())
    encoded, _ = encode_all(examples, tokenizer, DataConfig(), DataStats())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep],
                                                             reduction="sum"))
            count += int(keep.sum())
    assert got["target_tokens"] == count and got["examples"] == 12
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """A short run per method, its held-out set a separate file."""
    tmp = tmp_path_factory.mktemp("eval")
    train, held = write_rows(tmp / "train.jsonl", 0, 32), write_rows(tmp / "held.jsonl", 40, 6)
    runs = {}
    for method in METHODS:
        if method == "qlora":
            pytest.importorskip("bitsandbytes")
        out = tmp / method
        assert main(["train", f"model.name_or_path={llama_dir}", f"data.path={train}",
                     f"data.eval_path={held}", *SETTINGS.get(method, [f"adapter.method={method}"]),
                     "adapter.r=4",
                     "adapter.num_virtual_tokens=4", "train.batch_size=4", "train.max_steps=3",
                     "train.progress=false", f"train.output_dir={out}"]) == 0
        runs[method] = out
    return runs, held


@pytest.mark.parametrize("method", METHODS)
def test_every_method_scores_what_its_run_logged(method, trained, capsys):
    runs, held = trained
    run = runs[method]
    assert main(["eval", str(run), "--data", held, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "held" in out and f"results: {run / 'eval.json'}" in out
    result = json.loads((run / "eval.json").read_text())
    scored = result["datasets"]["held"]
    logged = json.loads((run / "summary.json").read_text())["eval_loss"]["after"]
    assert result["method"] == ("lora" if method == "dora" else method)
    assert scored["loss"] == pytest.approx(logged, rel=1e-5)  # the same examples and model
    assert scored["generated"] == scored["examples"] == 6
    assert 0.0 <= scored["exact_match"] <= scored["contains_match"] <= 1.0
    assert len(scored["samples"]) == 3 and scored["samples"][0]["reference"]
    # The run's report now carries the same figures.
    assert f"report: {run / 'report' / 'index.html'}" in out
    page = (run / "report" / "index.html").read_text()
    assert "<h2>leantune eval</h2>" in page and f"<td>{scored['loss']:.4f}</td>" in page


def test_accuracy_counts_replies_against_references(trained, monkeypatch):
    runs, held = trained

    def answer_half(model, tokenizer, prompts, *args, **kw):  # right on even rows only
        return [f"The answer is {(i % 10) + (3 * i) % 10}." if k % 2 == 0 else "no idea"
                for k, i in enumerate(range(40, 40 + len(prompts)))]

    monkeypatch.setattr(generation, "generate", answer_half)
    scored = evaluate_target(runs["lora"], [held])["datasets"]["held"]
    assert (scored["exact_match"], scored["contains_match"]) == (0.5, 0.5)


# --- multiple choice -------------------------------------------------------------------

def choice_docs() -> list[ChoiceDoc]:
    """Cloze questions (one context, " " + choice), a context ending in spaces (moved to
    the continuation, as lm-evaluation-harness does) and a partial-scoring document (one
    context per choice, the same continuation, as WinoGrande)."""
    docs = [ChoiceDoc([f"add {i} {i + 1}:"] * 3, [f" {2 * i + 1}", f" {2 * i}", " no idea"],
                      [f"{2 * i + 1}", f"{2 * i}", "no idea"], 0, f"doc {i}") for i in range(6)]
    docs.append(ChoiceDoc(["The answer is  "] * 2, ["yes", "no"], ["yes", "no"], 1, "spaces"))
    docs.append(ChoiceDoc(["Sarah paid Maria so Sarah", "Sarah paid Maria so Maria"],
                          [" was thanked."] * 2, ["Sarah", "Maria"], 1, "partial"))
    return docs


class LMEvalView(torch.nn.Module):
    """Our adapted model as lm-evaluation-harness sees a causal LM: ``model(ids).logits``
    aligned with ``ids``. For ReFT it marks the prompt positions the way our collator does,
    from the context length lm-evaluation-harness itself encoded (looked up by the row)."""

    def __init__(self, model, adapter, prompt_lengths: dict[tuple, int]):
        super().__init__()
        self.inner, self.adapter, self.prompt_lengths = model, adapter, prompt_lengths
        self.config, self.device = model.config, next(model.parameters()).device

    def tie_weights(self):  # HFLM calls it on the models it is handed
        pass

    def forward(self, input_ids, **_):
        from leantune.adapters.reft import intervention_kinds
        from leantune.config import parse_positions

        extra = {}
        if self.adapter is not None and self.adapter.name in ("loreft", "direft"):
            positions = parse_positions(self.adapter.cfg.positions)
            rows = [intervention_kinds(self.prompt_lengths[tuple(r.tolist())], *positions)
                    for r in input_ids]
            mask = torch.zeros_like(input_ids)
            for i, kinds in enumerate(rows):
                mask[i, :len(kinds)] = torch.tensor(kinds)
            extra["intervention_mask"] = mask
        logits = self.inner(input_ids=input_ids, use_cache=False, **extra).logits
        return type("Out", (), {"logits": logits[:, -input_ids.shape[1]:]})()


@pytest.mark.parametrize("method", ["base", *METHODS])
def test_choice_loglikelihoods_equal_lm_evaluation_harness(method, trained, llama_dir):
    """Per-choice log-likelihoods, packed where exact, against HFLM.loglikelihood."""
    lm_eval = pytest.importorskip("lm_eval")
    from accelerate import Accelerator
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from leantune.eval.multiple_choice import loglikelihoods
    from leantune.eval.requests import requests

    runs, _ = trained
    model, tokenizer, _, adapter = serve.load_target(Path(llama_dir) if method == "base"
                                                     else runs[method])
    model.eval()
    docs = choice_docs()
    pairs = [(c, k) for d in docs for c, k in zip(d.contexts, d.continuations)]
    mode = "none" if adapter is not None and not adapter.packs else "online"
    ours = loglikelihoods(model, requests(docs, tokenizer, 128), 5, mode, 128,
                          tokenizer.pad_token_id, Accelerator(cpu=True))
    view = LMEvalView(model, adapter, {})
    lm = HFLM(pretrained=view, tokenizer=tokenizer, batch_size=1)
    for c, k in pairs:
        ctx, cont = lm._encode_pair(c, k)
        view.prompt_lengths[tuple((ctx + cont)[:-1])] = len(ctx)
    theirs = [ll for ll, _ in lm.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        disable_tqdm=True)]
    assert lm_eval is not None and len(theirs) == len(ours) == 22
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)
    if adapter is None or adapter.virtual_tokens == 0:  # one tree row per shared context
        from leantune.eval.choice_trees import build_trees, tree_loglikelihoods

        trees = build_trees(docs, tokenizer, 128)
        assert [t is None for t in trees] == [False] * 7 + [True]  # WinoGrande-style: no
        branches = tree_loglikelihoods(model, trees[:7], 3, 128, tokenizer.pad_token_id,
                                       Accelerator(cpu=True))
        assert [x for b in branches for x in b] == pytest.approx(theirs[:20], rel=1e-5,
                                                                 abs=1e-4)


def test_choice_file_and_tasks_are_scored_with_intervals(trained, tmp_path, capsys):
    runs, _ = trained
    rows = [{"prompt": f"add {i} {i + 1}:", "choices": [str(2 * i + 1), str(2 * i)],
             "gold": i % 2 if i % 3 else str(2 * i + 1)} for i in range(9)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(runs["lora"]), "--data", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((runs["lora"] / "eval.json").read_text())
    mc = result["choices"]["mc"]
    assert mc["docs"] == 9 and len(mc["predictions"]) == 9
    golds = [r["gold"] if isinstance(r["gold"], int) else 0 for r in rows]
    assert mc["acc"] == pytest.approx(sum(p == g for p, g in zip(mc["predictions"], golds)) / 9)
    lo, hi = mc["acc_ci"]
    assert lo <= mc["acc"] <= hi and hi - lo > 0.2  # 9 documents: a wide interval
    assert result["macro"]["acc"] == mc["acc"] and "macro (1)" in out and "acc_norm" in out


def test_a_malformed_choice_row_names_its_line_and_field(tmp_path, trained):
    runs, _ = trained
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
                    + json.dumps({"prompt": "q", "choices": ["a", "b"], "gold": "c"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, field 'gold'"):
        evaluate_target(runs["lora"], [str(path)])


def test_wilson_interval_and_macro_average():
    from leantune.eval.multiple_choice import macro, wilson

    lo, hi = wilson(0.5, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)  # the textbook value
    assert wilson(1.0, 10)[1] == pytest.approx(1.0) and wilson(0.0, 10)[0] == pytest.approx(0.0)
    m = macro({"a": {"acc": 0.6, "acc_norm": 0.5, "docs": 100},
               "b": {"acc": 0.8, "acc_norm": 0.7, "docs": 400}})
    assert m["acc"] == pytest.approx(0.7) and m["acc_norm"] == pytest.approx(0.6)
    se = math.sqrt(0.6 * 0.4 / 100 + 0.8 * 0.2 / 400) / 2
    assert m["acc_ci"] == pytest.approx([0.7 - 1.959964 * se, 0.7 + 1.959964 * se])


def test_a_run_scores_its_tasks_as_leantune_eval_does(llama_dir, olmo, tmp_path, capsys):
    """eval.tasks before/after in the run, against `leantune eval --task` on the saved run:
    the same documents, model and scores through two paths."""
    out = tmp_path / "run"
    assert main(["train", f"model.name_or_path={llama_dir}", "data.path=task:arc-e",
                 "data.eval_path=task:arc-e:validation", "eval.tasks=arc-e,winogrande",
                 "eval.task_examples=8", "train.batch_size=2", "train.max_steps=2",
                 "optim.lr=1e-2", "train.progress=false", f"train.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "task accuracy" in printed and "arc_easy:" in printed and "macro:" in printed
    summary = json.loads((out / "summary.json").read_text())
    after = summary["task_accuracy"]["after"]["tasks"]
    assert set(after) == {"arc_easy", "winogrande"} and after["arc_easy"]["docs"] == 8
    assert summary["task_accuracy"]["before"]["step"] == 0
    assert summary["eval_flops"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in lines if r.get("tag") == "tasks"] == ["before", "after"]
    assert main(["eval", str(out), "--task", "arc-e,winogrande", "--limit", "8"]) == 0
    scored = json.loads((out / "eval.json").read_text())["choices"]
    for name in after:
        assert scored[name]["acc"] == after[name]["acc"]
        assert scored[name]["acc_norm"] == after[name]["acc_norm"]
    page = (out / "report" / "index.html").read_text()
    assert "<h2>Task accuracy</h2>" in page and "leantune eval" in page


def test_tasks_every_draws_an_accuracy_curve(llama_dir, olmo, tmp_path):
    """eval.tasks_every scores the tasks during training too: the periodic records sit
    between before and after in metrics.jsonl and summary.json's task_curve, the curve's
    last point is the "after" scoring, and the report plots it."""
    out = tmp_path / "run"
    assert main(["train", f"model.name_or_path={llama_dir}", "data.path=task:arc-e",
                 "eval.tasks=arc-e", "eval.task_examples=6", "eval.tasks_every=2",
                 "train.batch_size=2", "train.max_steps=5", "optim.lr=1e-2",
                 "train.progress=false", f"train.output_dir={out}"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tasks = [(r["step"], r["when"]) for r in lines if r.get("tag") == "tasks"]
    assert tasks == [(0, "before"), (2, "periodic"), (4, "periodic"), (5, "after")]
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["task_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 5]
    after = summary["task_accuracy"]["after"]
    assert set(summary["task_accuracy"]) == {"before", "after"}
    assert curve[-1]["macro_acc"] == after["macro"]["acc"]
    assert curve[-1]["tasks"]["arc_easy"] == after["tasks"]["arc_easy"]["acc"]
    assert (out / "report" / "tasks.png").is_file()


def test_shared_context_rows_fall_back_where_a_model_ignores_the_mask(llama_dir, caplog):
    """A model that does not honour a custom 4D mask must not get tree rows: the check
    on the first documents sees the difference and scores one row per choice."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from leantune.eval.multiple_choice import ChoiceScorer

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = serve.load_target(Path(llama_dir))[1]
    scorer = ChoiceScorer(tokenizer, 128, 4, "online", Accelerator(cpu=True))
    honest = scorer.score(model, choice_docs())
    assert scorer.share_context  # llama + sdpa honours it

    class MaskBlind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, attention_mask=None, **kw):  # drops the mask: attends causally
            return self.inner(**kw)

    blind = ChoiceScorer(tokenizer, 128, 4, "none", Accelerator(cpu=True))
    with caplog.at_level("WARNING"):
        fallback = blind.score(MaskBlind(), choice_docs())
    assert not blind.share_context and "one row per choice" in caplog.text
    assert fallback["predictions"] == honest["predictions"]


def plain_logp(model, prompt: list[int], completion: list[int], adapter=None) -> float:
    """A completion's log-probability from one plain forward of prompt + completion (ReFT:
    its prompt positions marked by the one-prompt rule)."""
    from leantune.adapters.reft import intervention_kinds
    from leantune.config import parse_positions

    ids = torch.tensor([prompt + completion])
    extra = {}
    if adapter is not None and adapter.name in ("loreft", "direft"):
        kinds = intervention_kinds(len(prompt), *parse_positions(adapter.cfg.positions))
        extra["intervention_mask"] = torch.tensor([kinds + [0] * len(completion)])
    with torch.no_grad():
        lp = model(input_ids=ids, **extra).logits[0, :-1].double().log_softmax(-1)
    picked = lp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]]
    return float(picked.sum())


@pytest.mark.parametrize("method", ["base", "lora", "loreft"])
def test_preference_pairs_are_scored_by_accuracy_and_margin(method, trained, llama_dir,
                                                            tmp_path, capsys):
    """Pair accuracy and mean margin against one plain forward per sequence: raw log-prob
    margins for a bare model, policy minus the base for an adapter's run."""
    from transformers import AutoModelForCausalLM

    from leantune.data.preference import PreferenceStats, encode_preference, to_preference
    from leantune.data.rows import Row

    runs, _ = trained
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"add {i % 10} {(3 * i) % 10}:",
             "chosen": f" The answer is {i % 10 + (3 * i) % 10}.",
             "rejected": f" The answer is {(i * 7) % 19 + 1}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = Path(llama_dir) if method == "base" else runs[method]
    result = evaluate_target(target, [str(path)])["pairs"]["pairs"]

    model, tokenizer, _, adapter = serve.load_target(target)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    margins = []
    for i, r in enumerate(rows):
        p = encode_preference(to_preference(Row(str(path), f"line {i + 1}", r), "pairs"),
                              tokenizer, 512, PreferenceStats())
        policy = [plain_logp(model.eval(), p.prompt, c, adapter) for c in (p.chosen, p.rejected)]
        ref = ([plain_logp(base, p.prompt, c) for c in (p.chosen, p.rejected)]
               if adapter is not None else [0.0, 0.0])
        margins.append((policy[0] - ref[0]) - (policy[1] - ref[1]))
    assert result["margin_kind"] == ("logp" if method == "base" else "reference")
    assert result["pairs"] == 12 and result["dropped"] == 0
    assert result["margin"] == pytest.approx(sum(margins) / 12, rel=1e-4, abs=1e-4)
    assert result["accuracy"] == sum(m > 0 for m in margins) / 12
    lo, hi = result["accuracy_ci"]
    assert lo <= result["accuracy"] <= hi
    assert main(["eval", str(target), "--data", str(path), "--out", str(tmp_path / "e.json")]) == 0
    assert "accuracy % [95% CI]" in capsys.readouterr().out
