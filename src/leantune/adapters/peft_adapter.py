"""The part every HF-PEFT method shares: wrap with ``get_peft_model``, save in PEFT's own
format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained``, vLLM and TGI), reload, and restore checkpoint weights
with a check that every trained tensor was found.
"""

from __future__ import annotations

import copy
import logging
from contextlib import AbstractContextManager
from pathlib import Path

from peft import IA3Config, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from leantune.adapters.base import Adapter, smoke_forward
from leantune.adapters.targets import linear_layers
from leantune.config import ConfigError
from leantune.model.load import first_line

log = logging.getLogger(__name__)


class PeftAdapter(Adapter):
    """A method that HF PEFT implements; subclasses say which config it takes."""

    def peft_config(self, model: nn.Module) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped by PEFT, after one 4-token forward to prove the wrapped model
        still runs (PEFT can wrap a module whose output it then mishandles).

        Raises:
            ConfigError: PEFT refuses the targets or the wrapped model fails: one line with
                the modules tried, PEFT's words and the fix.
        """
        config = self.peft_config(model)
        pristine = copy.deepcopy(config)  # PEFT rewrites the config it is given
        # Before PEFT touches the model: a refusal can leave it half wrapped.
        facts = type(model).__name__, sorted({n.rsplit(".", 1)[-1] for n in linear_layers(model)})
        try:
            wrapped = get_peft_model(model, config)
        except Exception as e:  # noqa: BLE001 - PEFT raises ValueError, TypeError, ...
            raise self._cannot_wrap(*facts, config, "PEFT refused them", e) from None
        try:
            smoke_forward(wrapped)
        except Exception as e:  # noqa: BLE001 - any failure here is the wrapping's
            wrapped = self._without_misfits(wrapped, pristine, facts, e)
        return wrapped

    def _without_misfits(self, wrapped: PeftModel, config: PeftConfig,
                         facts: tuple[str, list[str]], error: Exception) -> PeftModel:
        """After the wrapped model failed its first forward with ``error``: for targets a
        preset chose, the model wrapped again without those that fail on their own (a
        layer that subclasses ``nn.Linear`` but is not ``x W^T``, such as DeepSeek-V4's
        grouped ``o_a_proj``), said once; for targets named by the user, or when none or
        all fail alone, the one-line refusal."""
        targets = sorted(config.target_modules or [])
        if isinstance(self.cfg.target_modules, list) or not targets:
            raise self._cannot_wrap(*facts, config, "the wrapped model fails its first forward",
                                    error) from None
        base, misfits = wrapped.unload(), []
        for target in targets:
            trial = get_peft_model(base, _only(config, [target]))
            try:
                smoke_forward(trial)
            except Exception:  # noqa: BLE001 - the targets that fail alone are left out
                misfits.append(target)
            base = trial.unload()
        kept = [t for t in targets if t not in misfits]
        if not misfits or not kept:
            raise self._cannot_wrap(*facts, config, "the wrapped model fails its first forward",
                                    error) from None
        log.warning("adapter.target_modules=%s: %s fails under PEFT's %s wrapper on %s (%s); "
                    "the adapter goes on %s", self.cfg.target_modules, ", ".join(misfits),
                    self.name, facts[0], first_line(error), ", ".join(kept))
        wrapped = get_peft_model(base, _only(config, kept))
        smoke_forward(wrapped)
        return wrapped

    def _cannot_wrap(self, arch: str, leaves: list[str], config: PeftConfig, what: str,
                     error: BaseException) -> ConfigError:
        targets = getattr(config, "target_modules", None)  # prompt tuning has none
        tried = ", ".join(sorted(targets)) if isinstance(targets, (set, list)) else targets
        return ConfigError(
            f"adapter.method={self.name}: PEFT cannot wrap {arch}'s modules [{tried}]: {what} "
            f"({first_line(error)}); set adapter.target_modules to a list of the ones it takes "
            f"(its linear layers: {', '.join(leaves) or 'none'}), or use adapter.method=full")

    def save(self, model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)

    def load(self, base: nn.Module, directory: Path, trainable: bool = False) -> nn.Module:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        """Restore saved adapter weights into ``model`` in place.

        Raises:
            ValueError: the saved tensors are not exactly this adapter's (a missing one
                would silently keep its fresh init).
        """
        saved = load_peft_weights(str(directory))
        expected = set(get_peft_model_state_dict(model))
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(f"{directory}: adapter weights do not fit this model "
                             f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
        set_peft_model_state_dict(model, saved)

    def disabled(self, model: nn.Module) -> AbstractContextManager:
        """PEFT's own switch (``PeftModel.disable_adapter``): LoRA/DoRA deltas, IA3 scales
        and prompt tuning's virtual tokens all left out."""
        return _unwrap(model).disable_adapter()

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


def _only(config: PeftConfig, targets: list[str]) -> PeftConfig:
    """A copy of ``config`` that targets ``targets`` alone (IA3's feed-forward layers cut
    to match, as PEFT requires them among the targets)."""
    config = copy.deepcopy(config)
    config.target_modules = list(targets)
    if isinstance(config, IA3Config):
        config.feedforward_modules = [t for t in config.feedforward_modules or [] if t in targets]
    return config


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DistributedDataParallel
    return model
