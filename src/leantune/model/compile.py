"""``train.compile``: the model's repeated blocks (its decoder layers) compiled with
``torch.compile``, for the training step only.

Regional compilation (as Accelerate's ``compile_regions``, in place): every decoder layer
runs the same code, so the compiler traces and builds one layer and the other layers
reuse it, with their own weights as inputs. On a 2-core CPU that took SmolLM2-135M's
30 layers 27 s to compile (4 s from inductor's warm cache) against 208 s for the whole
model; what it buys is
inductor's fused elementwise kernels (norms, activations, residual adds, dropout masks,
dtype casts: 40-60 % of an eager CPU step) around the same matmuls. Figures, with the
CPU, in BENCHMARKS.md.

Only the training step runs compiled (:meth:`CompiledBlocks.active`): evaluation,
generation and sampling keep the eager layers, whose shapes (a growing KV cache, one
token per decode step) would recompile at every step. The head and the loss (chunked
log-softmax) stay eager: they sit outside the blocks. Shapes that change between steps
(packed rows of different totals) recompile once with symbolic sizes, then reuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The largest ``nn.ModuleList`` in ``model`` whose entries share one class (a causal
    LM's decoder layers); empty if it has none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(type(b) is type(m[0]) for b in m)]
    return list(max(lists, key=len)) if lists else []


class CompiledBlocks:
    """``model``'s :func:`repeated_blocks` compiled in place (``nn.Module.compile``), used
    only inside :meth:`active`. Compilation itself happens at the first call within it."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        self.blocks = repeated_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no repeated blocks to compile")
        self.compiled = []
        for block in self.blocks:
            block.compile(**compile_kwargs)
            # nn.Module.compile keeps the compiled call here and uses it while it is set.
            self.compiled.append(block._compiled_call_impl)
            block._compiled_call_impl = None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the layers run compiled; eager again afterwards."""
        for block, call in zip(self.blocks, self.compiled):
            block._compiled_call_impl = call
        try:
            yield
        finally:
            for block in self.blocks:
                block._compiled_call_impl = None
