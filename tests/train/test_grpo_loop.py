"""GRPO through ``leantune train`` on a tiny model: rollouts sampled, scored by a user's
reward file, advantages and the loss in the log with TRL's figure names; a run killed
after a checkpoint resumes to the same rollouts and weights as the uninterrupted one
(one and two iterations per generation); bad rewards stop the run naming the function."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.loop as loop
from leantune.config import ConfigError, load_config
from leantune.objectives.rewards import RewardError
from leantune.train.rollouts import SAMPLES_FILE

from conftest import Crash, crash_after_checkpoint

REWARD = '''
def vowels(prompts, completions, answer, **_):
    """Fraction of a completion's characters that are vowels: it varies within a group."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def wrong_length(prompts, completions, **_):
    return [0.0]


def raises(prompts, completions, **_):
    raise KeyError("missing column")
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARD)
    return path


def config(model_dir, out, reward_file, *overrides):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "data.path=problems:add", f"train.output_dir={out}",
        "objective.kind=grpo", "objective.num_generations=4",
        "objective.max_completion_length=6", "data.max_length=96", "data.eval_examples=6",
        f"objective.rewards=[{reward_file}:vowels]", "train.batch_size=3", "train.max_steps=4",
        "optim.lr=5e-3", "train.progress=false", "eval.generate=0", "adapter.dropout=0.0",
        *overrides])


def read(run_dir, name="metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_a_grpo_run_logs_rewards_advantages_and_samples(llama_dir, reward_file, tmp_path):
    out = tmp_path / "run"
    summary = loop.train(config(llama_dir, out, reward_file, "objective.beta=0.05"))
    steps = [r for r in read(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert 0 <= r["reward"] <= 1 and r["reward_std"] > 0
        assert r["rewards/vowels/mean"] == pytest.approx(r["reward"])
        assert 1 <= r["completions/mean_length"] <= 6
        assert r["kl"] >= 0 and r["entropy"] > 0
        assert 0 <= r["clip_ratio/region_mean"] <= 1
        assert r["grad_norm"] > 0
    # Every step sampled 3 prompts x 4 completions; the counters say so.
    last = steps[-1]
    assert last["groups"] == 12 and 12 * 4 <= last["rollout_tokens"] <= 12 * 4 * 6
    assert last["rollout_tokens_per_second"] > 0 and last["rollout_flops"] > 0
    evals = [r for r in read(out) if r.get("tag") in ("before", "after")]
    assert [e["tag"] for e in evals] == ["before", "after"]
    assert all(0 <= e["eval_reward"] <= 1 for e in evals)
    samples = read(out, SAMPLES_FILE)
    assert [s["generation"] for s in samples] == [0, 1, 2, 3]
    assert all(len(s["completions"]) == 4 and "answer" in s for s in samples)
    assert summary["objective"]["kind"] == "grpo"
    assert summary["grpo"]["rollout_tokens"] == last["rollout_tokens"]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("iterations", [1, 2])
def test_a_killed_run_resumes_to_the_same_rollouts_and_weights(llama_dir, reward_file, tmp_path,
                                                               monkeypatch, iterations):
    """Killed after the step-3 checkpoint (mid-generation with two iterations: the
    rollouts in use travel in the checkpoint), resumed: the same samples, log and weights."""
    knobs = ("train.max_steps=6", "checkpoint.every=3",
             f"objective.num_iterations={iterations}")
    straight = tmp_path / "straight"
    loop.train(config(llama_dir, straight, reward_file, *knobs))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, at_step=3)
        with pytest.raises(Crash):
            loop.train(config(llama_dir, out, reward_file, *knobs))
    loop.train(config(llama_dir, out, reward_file, *knobs, "train.resume=true"))
    expected, got = weights(straight), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert read(out, SAMPLES_FILE) == read(straight, SAMPLES_FILE)
    timing = ("seconds", "per_second", "elapsed", "peak_memory")
    def figures(run_dir):
        return [{k: v for k, v in r.items() if not any(t in k for t in timing)}
                for r in read(run_dir) if "loss" in r]
    assert figures(out) == figures(straight)


@pytest.mark.parametrize("name,message", [("wrong_length", "reward .*wrong_length returned 1 "
                                           "values for 12 completions"),
                                          ("raises", "reward .*raises raised KeyError")])
def test_a_bad_reward_function_stops_the_run_naming_it(llama_dir, reward_file, tmp_path, name,
                                                       message):
    with pytest.raises(RewardError, match=message):
        loop.train(config(llama_dir, tmp_path / "run", reward_file,
                          f"objective.rewards=[{reward_file}:{name}]", "eval.before=false"))


@pytest.mark.parametrize("override,key", [
    ("fast_forward.enabled=true", "fast_forward.enabled"),
    ("objective.num_generations=1", "objective.num_generations"),
    ("objective.reference=cached", "objective.reference"),
    ("objective.reward_weights=[1.0,2.0]", "objective.reward_weights"),
    ("objective.top_p=0", "objective.top_p"),
    ("data.packing=offline", "data.packing"),
])
def test_grpo_settings_that_cannot_work_are_refused_naming_the_key(llama_dir, reward_file,
                                                                    tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        config(llama_dir, tmp_path / "run", reward_file, override)


@pytest.mark.parametrize("method,beta", [("lora", 0.05), ("ia3", 0.0), ("prompt_tuning", 0.0),
                                         ("full", 0.05), ("loreft", 0.05), ("direft", 0.0)])
def test_every_adapter_trains_under_grpo(llama_dir, reward_file, tmp_path, method, beta):
    """Each adapter samples, trains and saves; with beta > 0 its reference is the adapter
    switched off (a frozen copy for full fine-tuning), so the KL starts at 0."""
    out = tmp_path / "run"
    summary = loop.train(config(llama_dir, out, reward_file, f"adapter.method={method}",
                                f"objective.beta={beta}", "train.max_steps=2",
                                "eval.before=false"))
    steps = [r for r in read(out) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)
    if beta:
        assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["grpo"]["reference"] == (None if not beta else
                                            "copy" if method == "full" else "adapter_off")
    assert (out / ("model" if method == "full" else "adapter")).is_dir()


def test_gradient_accumulation_takes_batch_size_prompts_per_micro_batch(llama_dir, reward_file,
                                                                         tmp_path):
    out = tmp_path / "run"
    loop.train(config(llama_dir, out, reward_file, "train.grad_accum=2", "train.max_steps=2",
                      "eval.before=false"))
    steps = [r for r in read(out) if "loss" in r]
    assert steps[-1]["groups"] == 2 * 2 * 3  # steps x micro-batches x prompts
    samples = read(out, SAMPLES_FILE)
    assert [s["generation"] for s in samples] == [0, 1]
