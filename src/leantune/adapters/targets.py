"""Which modules an adapter wraps: target-module presets that read the model's own
module tree, so one config works across Llama, Qwen2, Mistral, Gemma (``self_attn`` /
``mlp``), GPT-2 (``attn.c_attn`` / ``mlp.c_fc`` Conv1D layers) and Phi (``self_attn.dense``,
``mlp.fc1``).

A preset resolves to suffixes ``"<block>.<leaf>"`` (e.g. ``self_attn.q_proj``,
``mlp.c_proj``), which PEFT matches against the end of each module's qualified name.
Keeping the block in the suffix matters: GPT-2 has a ``c_proj`` in attention and
another in the MLP.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

ATTENTION_BLOCKS = ("self_attn", "attn", "attention", "self_attention")
MLP_BLOCKS = ("mlp", "feed_forward", "ffn")


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every matmul layer (``nn.Linear``, incl. 4-bit ones, or GPT-2's ``Conv1D``) but the
    output head and the routers of mixture-of-experts layers, by qualified name."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    experts = _expert_count(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head
            and not is_router(name, m, experts)}


def _expert_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config()
    return next((n for key in EXPERT_COUNTS if isinstance(n := getattr(text, key, None), int)
                 and n > 0), None)


def is_router(name: str, module: nn.Module, experts: int | None) -> bool:
    """Whether a linear layer picks experts rather than transforming hidden states: a
    ``*Router*`` class or a ``router`` in its name, or (in a model with ``experts``
    experts) a ``gate`` / ``*_gate`` layer with one output per expert or a single one
    (Qwen2-MoE's shared-expert gate). Wrapping one changes which experts run, and
    routers that return (weights, indices) break under PEFT's wrapper (Llama-4)."""
    leaf = name.rsplit(".", 1)[-1]
    if "router" in type(module).__name__.lower() or "router" in name.lower():
        return True
    if experts is None or not (leaf == "gate" or leaf.endswith("_gate")):
        return False
    return in_out_features(module)[1] in (experts, 1)


def all_linear_targets(model: nn.Module) -> list[str]:
    """PEFT ``target_modules`` naming every layer of :func:`linear_layers` and nothing
    else: for each, the shortest suffix of its name (``q_proj``, then ``self_attn.q_proj``,
    ...) that no other kind of module ends with (a router, the head, a non-linear
    module of the same name).

    Raises:
        ValueError: the model has no such layer.
    """
    keep = linear_layers(model)
    if not keep:
        raise ValueError(f"adapter.target_modules=all-linear: {type(model).__name__} has no "
                         "linear layer outside its head and routers")
    others = [n for n, _ in model.named_modules() if n and n not in keep]
    suffixes = set()
    for name in keep:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if not any(o == s or o.endswith("." + s) for o in others):
                suffixes.add(s)
                break
    return sorted(suffixes)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear layer; GPT-2's Conv1D stores its weight as [in, out]."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def _block_suffix(name: str, blocks: tuple[str, ...]) -> str | None:
    """``"model.layers.0.self_attn.q_proj"`` -> ``"self_attn.q_proj"`` if inside ``blocks``."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in blocks:
            return ".".join(parts[i:])
    return None


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """Module-name suffixes for ``preset`` in ``("attention", "mlp", "all-linear")``.

    Raises:
        ValueError: the model has no linear layer under such a block (an architecture
            with other names): the message lists the names it does have.
    """
    blocks = {"attention": ATTENTION_BLOCKS, "mlp": MLP_BLOCKS,
              "all-linear": ATTENTION_BLOCKS + MLP_BLOCKS}[preset]
    layers = linear_layers(model)
    found = sorted({s for name in layers if (s := _block_suffix(name, blocks)) is not None})
    if not found:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ValueError(
            f"adapter.target_modules={preset}: {type(model).__name__} has no linear layer under "
            f"a module named {' / '.join(blocks)}; give the module names as a list instead "
            f"(its linear layers are: {', '.join(leaves) or 'none'})")
    return found


def feedforward_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The ``targets`` that are MLP down-projections (input wider than output): IA3
    scales those layers' inputs (the MLP's hidden activations), the others' outputs."""
    found = set()
    for name, module in linear_layers(model).items():
        suffix = _block_suffix(name, MLP_BLOCKS)
        matched = [t for t in targets if name == t or name.endswith("." + t)]
        if suffix is not None and matched:
            fan_in, fan_out = in_out_features(module)
            if fan_in > fan_out:
                found.update(matched)
    return sorted(found)
