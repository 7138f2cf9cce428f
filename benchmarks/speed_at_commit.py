"""The same arm as bench speed's 'leantune fp32' (LoRA r16, online, 32 ShareGPT exchanges
of <= 512 tokens, 8 per step, lr 2e-4) on an older commit's code: run with
PYTHONPATH=<worktree>/src. Module paths are tried as they are now, then as they were
before the package layout of issue 28."""
import json
import resource
import sys

import torch
from accelerate import Accelerator

import leantune
from leantune.adapters import build_adapter
from leantune.bench.common import sharegpt_exchanges
from leantune.bench.packing import run_mode
from leantune.config import AdapterConfig, ModelConfig

try:
    from leantune.model.load import load_model, load_tokenizer, resolve_local
except ImportError:  # before issue 28: one module leantune/model.py
    from leantune.model import load_model, load_tokenizer, resolve_local

print(leantune.__file__, file=sys.stderr)
acc = Accelerator(cpu=True)
cfg = ModelConfig(name_or_path="embedded:smollm2")
source = resolve_local(cfg)
tok = load_tokenizer(cfg, source)
data = sharegpt_exchanges(tok, 48, 512)
train, held = data[:32], data[32:]
torch.manual_seed(0)
base = load_model(ModelConfig(name_or_path=source, dtype="float32"), source)
model = build_adapter(AdapterConfig(r=16, alpha=32.0, dropout=0.0)).apply(base)
init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
mode = sys.argv[1] if len(sys.argv) > 1 else "online"
r = run_mode(model, init, mode, train, held, 8, 512, tok.pad_token_id, 2e-4, acc, micro_tokens=4096)
r["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(r))
