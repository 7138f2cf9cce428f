"""LoReFT and DiReFT (Wu et al. 2024, arXiv 2404.03592): edit hidden states, not weights.

At chosen decoder layers, the layer's output ``h`` [d] at chosen prompt positions (the
first ``p`` and last ``s`` prompt tokens, ``f{p}+l{s}``) is replaced by

- LoReFT: ``Φ(h) = h + Rᵀ(W h + b − R h)``, R [r, d] with orthonormal rows, W [r, d], b [r]
- DiReFT: ``Φ(h) = h + W₂ᵀ(W₁ h + b)``, W₁, W₂ [r, d], b [r], no orthogonality

(dropout on the edit ``Φ(h) − h``). Both start as the identity (LoReFT: W = R, b = 0;
DiReFT: W₂ = 0), so training starts from the base model as with LoRA's B = 0. pyreft
starts W at random instead; on the embedded default that moved the held-out loss from
1.88 to 2.97-3.44 before the first step (BENCHMARKS.md). 2rd + r parameters per intervention; tied: one per
layer for prefix and suffix positions, untied: one each. R stays orthonormal because it
is a ``torch.nn.utils.parametrizations.orthogonal`` of an unconstrained matrix: the
optimizer and Fast Forward both step in that matrix's space, so no re-orthonormalization
is ever needed.

Native, on plain forward hooks: every collated batch says where each example's prompt
lies (``prompt_position``, ``prompt_length``; every packed example with its own), the
model's forward takes those (:attr:`ReftModel.batch_inputs`), derives the positions to
edit (:func:`kinds_from_prompt`) and the hooks read them. Generation edits the prompt's positions
in the prefill pass only, never generated tokens. Saved as ``reft_config.json`` +
``reft_model.safetensors`` together, so a directory loads on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from leantune.adapters.base import Adapter, NotMergeable
from leantune.config import AdapterConfig, parse_positions
from leantune.model.dropout import FastDropout

CONFIG_FILE, WEIGHTS_FILE = "reft_config.json", "reft_model.safetensors"
PREFIX, SUFFIX = 1, 2  # intervention_mask values; 0 = leave the position alone


def intervention_kinds(n: int, prefix: int, suffix: int) -> list[int]:
    """Per position of an ``n``-token prompt: PREFIX for its first ``prefix`` tokens,
    SUFFIX for its last ``suffix``, else 0 (ReFT's ``f{prefix}+l{suffix}``).

    A prompt shorter than ``prefix + suffix`` is split between them (the paper's rule):
    ``prefix <- min(prefix, n // 2)`` and ``suffix <- min(suffix, ceil(n / 2))``, so no
    position is both.
    """
    if n < prefix + suffix:
        prefix, suffix = min(prefix, n // 2), min(suffix, (n + 1) // 2)
    kinds = [0] * n
    kinds[:prefix] = [PREFIX] * prefix
    if suffix:
        kinds[n - suffix:] = [SUFFIX] * suffix
    return kinds


def kinds_from_prompt(position: torch.Tensor, length: torch.Tensor, prefix: int, suffix: int
                      ) -> torch.Tensor:
    """:func:`intervention_kinds` for every position at once: ``position`` [B, T] is a
    token's index in its example's prompt (-1 outside prompts), ``length`` [B, T] that
    prompt's length; returns ``intervention_mask`` [B, T]."""
    short = length < prefix + suffix
    first = torch.where(short, torch.clamp(length // 2, max=prefix), prefix)
    last = torch.where(short, torch.clamp((length + 1) // 2, max=suffix), suffix)
    inside = position >= 0
    mask = torch.zeros_like(position)
    mask[inside & (position >= length - last)] = SUFFIX
    mask[inside & (position < first)] = PREFIX
    return mask


@dataclass
class ReftSpec:
    """Everything needed to rebuild the interventions (saved with the weights)."""

    method: str          # loreft | direft
    hidden_size: int
    rank: int
    layers: list[int]
    positions: str       # f{p}+l{s}
    tied: bool
    dropout: float

    @property
    def kinds(self) -> list[str]:
        """Interventions per layer: one shared, or one per position group that exists
        (an unused one would never train, and DDP rejects unused parameters)."""
        if self.tied:
            return ["both"]
        prefix, suffix = parse_positions(self.positions)
        return [k for k, n in (("prefix", prefix), ("suffix", suffix)) if n > 0]


class _Matrix(nn.Module):
    """Holds one [r, d] weight, so a parametrization can be registered on it."""

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's init


class LoReFT(nn.Module):
    """``Φ(h) = h + Rᵀ(W h + b − R h)`` for ``h`` [N, d]; R's rows are orthonormal."""

    def __init__(self, dim: int, rank: int, dropout: float):
        super().__init__()
        # Cayley map: under Adam, torch's default for a wide matrix (Householder) collapsed
        # R to zeros after one step in our tests; Cayley and matrix_exp stay orthonormal.
        self.rotation = orthogonal(_Matrix(rank, dim), orthogonal_map="cayley")
        self.source = _Matrix(rank, dim)
        with torch.no_grad():  # W = R, b = 0: Φ is the identity until training moves them
            self.source.weight.copy_(self.rotation.weight)
        self.bias = nn.Parameter(torch.zeros(rank))
        self.dropout = FastDropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.rotation.weight
        return h + self.dropout((h @ self.source.weight.T + self.bias - h @ r.T) @ r)


class DiReFT(nn.Module):
    """``Φ(h) = h + W₂ᵀ(W₁ h + b)`` for ``h`` [N, d]."""

    def __init__(self, dim: int, rank: int, dropout: float):
        super().__init__()
        self.source, self.up = _Matrix(rank, dim), _Matrix(rank, dim)
        nn.init.zeros_(self.up.weight)  # Φ is the identity until training moves W₂ (LoRA's B = 0)
        self.bias = nn.Parameter(torch.zeros(rank))
        self.dropout = FastDropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.dropout((h @ self.source.weight.T + self.bias) @ self.up.weight)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``model.layers``, GPT-2's ``transformer.h``)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers to intervene on")


class ReftModel(nn.Module):
    """A frozen causal LM with interventions hooked onto the outputs of ``spec.layers``.

    ``forward(..., prompt_position=[B, T], prompt_length=[B, T])`` edits the first and
    last prompt positions ``spec.positions`` names (an explicit ``intervention_mask``
    [B, T] of PREFIX / SUFFIX / 0 takes precedence); without either the base model runs
    untouched. ``generate`` marks the prompt's own positions.
    """

    #: the bookkeeping keys of a collated batch this model's forward takes
    batch_inputs = ("prompt_position", "prompt_length")

    def __init__(self, base: nn.Module, spec: ReftSpec):
        super().__init__()
        self.base, self.spec = base, spec
        for p in base.parameters():
            p.requires_grad_(False)
        cls = LoReFT if spec.method == "loreft" else DiReFT
        self.interventions = nn.ModuleDict({
            f"layer{i}_{kind}": cls(spec.hidden_size, spec.rank, spec.dropout)
            for i in spec.layers for kind in spec.kinds})
        self._mask: torch.Tensor | None = None
        self._where: dict[int, torch.Tensor] = {}  # PREFIX/SUFFIX -> flat positions in _mask
        self._prefill_only = self._via_forward = self._off = False
        layers = decoder_layers(base)
        for i in spec.layers:
            layers[i].register_forward_hook(self._hook(i))
        base.register_forward_pre_hook(self._before_base)
        base.register_forward_hook(self._after_base)

    @property
    def config(self):
        return self.base.config

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def _hook(self, layer: int):
        def edit(module, args, output):
            if self._mask is None or self._off:
                return output
            h = output[0] if isinstance(output, tuple) else output
            h = self._intervene(layer, h)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return edit

    def _before_base(self, module, args):
        # The base called directly (not through forward/generate) runs unedited; a mask
        # left from an earlier forward is for gradient checkpointing's re-runs only.
        if not (self._via_forward or self._prefill_only):
            self._set_mask(None)
        self._via_forward = False

    def _after_base(self, module, args, output):
        if self._prefill_only:  # generation: the prompt's pass is done, leave new tokens alone
            self._set_mask(None)

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        """Where to edit, found once per forward rather than once per hooked layer."""
        self._mask, self._where = mask, {}
        if mask is None:
            return
        for kind in (PREFIX, SUFFIX):
            idx = (mask.reshape(-1) == kind).nonzero().squeeze(1)
            if idx.numel():
                self._where[kind] = idx

    def _intervene(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h`` [B, T, d] with the positions marked in the current mask [B, T] edited."""
        if self._mask.shape != h.shape[:2]:
            raise ValueError(f"intervention_mask {tuple(self._mask.shape)} does not match the "
                             f"hidden states {tuple(h.shape[:2])}")
        flat = h.reshape(-1, h.shape[-1])
        for kind, idx in self._where.items():
            which = "both" if self.spec.tied else ("prefix" if kind == PREFIX else "suffix")
            module = self.interventions[f"layer{layer}_{which}"]
            edited = module(flat[idx].to(module.bias.dtype)).to(flat.dtype)
            flat = flat.index_copy(0, idx, edited)  # out of place: autograd sees it
        return flat.view_as(h)

    @contextmanager
    def interventions_off(self) -> Iterator[None]:
        """The base model alone within the block, whatever the batch marks."""
        self._off = True
        try:
            yield
        finally:
            self._off = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                intervention_mask=None, prompt_position=None, prompt_length=None, **kwargs):
        if intervention_mask is None and prompt_position is not None:
            intervention_mask = kinds_from_prompt(prompt_position, prompt_length,
                                                  *parse_positions(self.spec.positions))
        # The mask stays set after the forward: gradient checkpointing re-runs the layers
        # (and so the hooks) during backward, which must edit the same positions again.
        self._set_mask(intervention_mask)
        self._prefill_only, self._via_forward = False, True
        return self.base(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs):
        """The base model's ``generate`` with the prompt's first/last positions edited in
        the prefill pass. Prompts may be left- or right-padded: positions follow
        ``attention_mask``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._set_mask(prompt_mask(attention_mask, self.spec.positions))
        self._prefill_only = True
        try:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **kwargs)
        finally:
            self._set_mask(None)
            self._prefill_only = False


def prompt_mask(attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """``intervention_mask`` [B, T] for prompts marked by ``attention_mask`` (any padding)."""
    real = attention_mask.bool()
    position = torch.where(real, real.long().cumsum(1) - 1, -1)
    length = torch.where(real, real.long().sum(1, keepdim=True), 0)
    return kinds_from_prompt(position, length, *parse_positions(positions))


class Reft(Adapter):
    """``adapter.method: loreft | direft`` behind the common adapter interface."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__(cfg)
        self.name = cfg.method

    def spec(self, model: nn.Module) -> ReftSpec:
        n = model.config.num_hidden_layers
        layers = list(range(n)) if self.cfg.layers == "all" else list(self.cfg.layers)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"adapter.layers: {bad} out of range for a {n}-layer model")
        return ReftSpec(self.cfg.method, model.config.hidden_size, self.cfg.r, layers,
                        self.cfg.positions, self.cfg.tied, self.cfg.dropout)

    def apply(self, model: nn.Module) -> nn.Module:
        return ReftModel(model, self.spec(model))

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        while isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # DistributedDataParallel
        return model.interventions_off()

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(model.spec) | {"base_model_name_or_path": model.config.name_or_path}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if state_dict is None:
            state_dict = {f"interventions.{k}": v
                          for k, v in model.interventions.state_dict().items()}
        state = {k.removeprefix("interventions."): v.detach().contiguous()
                 for k, v in state_dict.items() if k.startswith("interventions.")}
        save_file(state, directory / WEIGHTS_FILE)

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        config = json.loads((directory / CONFIG_FILE).read_text())
        config.pop("base_model_name_or_path", None)
        model = ReftModel(base, ReftSpec(**config))
        self.load_weights(model, directory)
        for p in model.interventions.parameters():
            p.requires_grad_(trainable)
        return model

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        """Raises: ValueError when the saved tensors are not exactly this model's."""
        try:
            model.interventions.load_state_dict(load_file(directory / WEIGHTS_FILE))
        except RuntimeError as e:
            raise ValueError(f"{directory}: ReFT weights do not fit this model: {e}") from None

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeable(
            f"adapter.method={self.name} cannot be merged: ReFT edits hidden states at chosen "
            "prompt positions, which no change of weights reproduces. Use the run's adapter/ "
            "with `leantune generate RUN_DIR` instead.")
