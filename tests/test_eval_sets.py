"""``leantune eval``: the loss equals an independent per-example computation and the
loss the run itself logged; every method is scored; match accuracy counts what it says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import leantune.serve as serve
from leantune.cli import main
from leantune.config import DataConfig, ModelConfig
from leantune.data.dataset import DataStats, encode_all, load_examples
from leantune.eval_sets import evaluate_target, match_scores, normalize
from leantune.model import load_tokenizer

METHODS = ["lora", "dora", "qlora", "ia3", "prompt_tuning", "full", "loreft", "direft"]
SETTINGS = {"dora": ["adapter.method=lora", "adapter.use_dora=true"]}


def write_rows(path, start: int, n: int) -> str:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 10} {(3 * i) % 10}"},
        {"role": "assistant", "content": f"The answer is {i % 10 + (3 * i) % 10}."}]}) + "\n"
        for i in range(start, start + n)))
    return str(path)


def test_normalize_and_match_scores():
    assert normalize("  The Answer is  7.\n") == "the answer is 7"
    scores = match_scores(["The answer is 7.", "It is 7, I think", "8"],
                          ["the answer is 7", "7", "7"])
    assert scores == {"generated": 3, "exact_match": 1 / 3, "contains_match": 2 / 3}
    assert match_scores([], []) == {"generated": 0, "exact_match": None, "contains_match": None}


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

    monkeypatch.setattr(serve, "generate", answer_half)
    scored = evaluate_target(runs["lora"], [held])["datasets"]["held"]
    assert (scored["exact_match"], scored["contains_match"]) == (0.5, 0.5)
