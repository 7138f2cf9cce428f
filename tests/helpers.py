"""Builders shared by tests in several folders: tiny adapted models on packed batches
(the LM-head and loss-path tests) and chat rows with checkable answers (eval, report,
trackers)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from leantune.adapters import build_adapter
from leantune.config import AdapterConfig
from leantune.data.encode import IGNORE, Encoded
from leantune.packing.collate import collate_rows

ARCHS = ["llama", "gpt2", "gemma"]
METHODS = ["lora", "dora", "ia3", "prompt_tuning", "loreft", "full"]


def build(directory: str, method: str):
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch.manual_seed(3)
    cfg = AdapterConfig(method="lora" if method == "dora" else method,
                        use_dora=method == "dora", r=4, alpha=8.0, dropout=0.0,
                        num_virtual_tokens=3, layers="all", positions="f2+l2")
    adapter = build_adapter(cfg)
    model = adapter.apply(base)
    with torch.no_grad():  # LoRA's B = 0 would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model, adapter


def packed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of packed examples with prompts masked: few positions predict a target."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for shapes in ([(9, 6), (7, 5)], [(12, 10)]):
        row = []
        for n, prompt in shapes:
            ids = torch.randint(5, vocab, (n,), generator=g).tolist()
            row.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
        rows.append(row)
    return collate_rows(rows, 0)


def write_rows(path, start: int, n: int) -> str:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i % 10} {(3 * i) % 10}"},
        {"role": "assistant", "content": f"The answer is {i % 10 + (3 * i) % 10}."}]}) + "\n"
        for i in range(start, start + n)))
    return str(path)
