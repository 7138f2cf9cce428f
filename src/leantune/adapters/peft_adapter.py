"""The part every HF-PEFT method shares: wrap with ``get_peft_model``, save in PEFT's own
format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained``, vLLM and TGI), reload, and restore checkpoint weights
with a check that every trained tensor was found.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from leantune.adapters.base import Adapter, smoke_forward
from leantune.adapters.targets import linear_layers
from leantune.config import ConfigError
from leantune.model import first_line


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
        # Before PEFT touches the model: a refusal can leave it half wrapped.
        facts = type(model).__name__, sorted({n.rsplit(".", 1)[-1] for n in linear_layers(model)})
        try:
            wrapped = get_peft_model(model, config)
        except Exception as e:  # noqa: BLE001 - PEFT raises ValueError, TypeError, ...
            raise self._cannot_wrap(*facts, config, "PEFT refused them", e) from None
        try:
            smoke_forward(wrapped)
        except Exception as e:  # noqa: BLE001 - any failure here is the wrapping's
            raise self._cannot_wrap(*facts, config, "the wrapped model fails its first forward",
                                    e) from None
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

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
