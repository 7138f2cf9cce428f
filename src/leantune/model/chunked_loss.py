"""The LM head and log-softmax together, in chunks of target positions, so the
log-probabilities of N targets (and any loss built on them) never hold their ``[N, V]``
logits.

For hidden states ``h`` ``[N, H]`` at the target positions, the head's ``W`` ``[V, H]``
and bias ``b``, and targets ``t``::

    z = h W^T + b                      (one chunk of C rows at a time)
    lp_i = z_{i, t_i} - logsumexp_v(z_iv)
    dz_i = g_i * (onehot(t_i) - softmax(z_i))   (g_i: lp_i's incoming gradient)
    dh = dz W,   dW = dz^T h,   db = sum_i dz_i

Forward keeps only ``logsumexp`` per row; backward recomputes each chunk's logits. Every
chunk is computed in place in one reused fp32 buffer (logsumexp, exp, the one-hot
subtraction): fresh 64 MiB tensors per chunk made the loss's elementwise work 15 % of
an fp32 CPU step, most of it the page faults of new memory. What
this saves: the logits in the compute dtype, their fp32 copy for the softmax, and its
gradient, all ``[N, V]`` (SmolLM2-135M, V = 49,152: ~0.8 GB per 4,096 targets in fp32),
for one chunk's ``[C, V]`` fp32 at a time (C = :data:`CHUNK_ELEMENTS` // V: 341 rows,
64 MiB, at SmolLM2's vocabulary). What it costs: the head's forward runs again in
backward, +1/3 of the head's training FLOPs (not charged to the FLOPs ledger, which
counts the model's FLOPs as MFU does).

Under autocast the matmuls take the autocast dtype and the softmax is fp32, as the plain
path (bf16 logits upcast for the loss) does, so the two agree to rounding. No library
does this on CPU as well as GPU (Liger's and Apple's cut-cross-entropy kernels are
Triton, CUDA only), hence the small autograd function.

It applies where the head is a plain ``nn.Linear`` whose output *is* the logits; a model
that transforms them after the head (Gemma-2's soft-capping, Cohere's logit scale) is
caught by :func:`leantune.train.loss_paths.check_loss_paths`, which compares this loss
with the model's own on the run's first examples at start-up and turns chunking off for
the model (:func:`turn_off`) when they differ.
"""

from __future__ import annotations

import weakref

import torch

from leantune.model.head import output_head

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32
_OFF: weakref.WeakSet = weakref.WeakSet()  # heads :func:`turn_off` took chunking from


def chunked_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """``model``'s head when the chunked loss applies to it, else None."""
    head = output_head(model)
    if type(head) is not torch.nn.Linear or head in _OFF:  # noqa: E721 (no subclasses)
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.dim() != 2:
        return None  # FSDP2's DTensor, a quantized weight: the head's own forward knows it
    return head


def turn_off(model: torch.nn.Module) -> None:
    """Compute ``model``'s loss through its own head from now on."""
    head = output_head(model)
    if head is not None:
        _OFF.add(head)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor,
            half: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` into the fp32 buffer ``out`` ``[C, V]``; ``half`` (a buffer in the
    compute dtype, when that is not fp32) takes the matmul's own output first."""
    target = half if half is not None else out
    torch.mm(h, w.t(), out=target)
    if b is not None:
        target.add_(b)
    if half is not None:
        out.copy_(half)
    return out


def _buffers(rows: int, w: torch.Tensor, dtype: torch.dtype) -> tuple:
    """One fp32 ``[rows, V]`` chunk buffer (and one in ``dtype`` for the matmul when that
    is not fp32), reused by every chunk: a fresh 64 MiB tensor per chunk page-faults its
    memory in again (12-90 ms a chunk on CPU, more than the arithmetic on it)."""
    out = torch.empty(rows, w.shape[0], dtype=torch.float32, device=w.device)
    half = None if dtype == torch.float32 else torch.empty(rows, w.shape[0], dtype=dtype,
                                                           device=w.device)
    return out, half


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, rows):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            n = hidden.shape[0]
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            out, half = _buffers(min(rows, n), w, dtype)
            for s in range(0, n, rows):
                c = min(rows, n - s)
                z = _logits(hidden[s:s + c].to(dtype), w, b, out[:c],
                            None if half is None else half[:c])
                picked = z.gather(1, targets[s:s + c, None])[:, 0]
                top = z.amax(-1)
                # logsumexp in place: the buffer is the chunk's logits no more after this
                lse[s:s + c] = z.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
                logp[s:s + c] = picked - lse[s:s + c]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.rows = dtype, rows
        ctx.cast = w if w is not weight else None  # the head in the compute dtype, once
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, rows = ctx.dtype, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = ctx.cast if ctx.cast is not None else weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            n = hidden.shape[0]
            out, half = _buffers(min(rows, n), w, dtype)
            for s in range(0, n, rows):
                c = min(rows, n - s)
                h = hidden[s:s + c].to(dtype)
                # d logp_i / d z_i = onehot(t_i) - softmax(z_i), times logp_i's gradient
                dz = _logits(h, w, b, out[:c], None if half is None else half[:c])
                dz.sub_(lse[s:s + c, None]).exp_()
                dz[torch.arange(c, device=dz.device), targets[s:s + c]] -= 1
                dz.mul_(-grad[s:s + c, None])
                if need_b:
                    db += dz.sum(0)
                if half is not None:
                    dz = half[:c].copy_(dz)
                if need_h:
                    dh[s:s + c] = dz @ w
                if need_w:  # accumulated in fp32 over chunks, as autocast's linear would
                    dw += (dz.t() @ h).float()
        ctx.cast = None
        return (dh, dw.to(weight.dtype) if need_w else None,
                db.to(bias.dtype) if need_b else None, None, None, None)


def linear_log_probs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[N]`` fp32 log-probabilities of ``targets`` ``[N]`` (all valid: no ignore index)
    under ``head(hidden)`` ``[N, V]``, chunked; equal to
    ``-F.cross_entropy(head(hidden).float(), targets, reduction="none")``.

    ``dtype``: the matmuls' dtype, the model's compute dtype
    (:func:`leantune.model.precision.compute_dtype`: the loss runs after the model's
    autocast forward has returned, so bf16-mixed must say so); None: the autocast dtype
    around the call, else the promotion of ``hidden``'s and the weight's."""
    rows = max(1, CHUNK_ELEMENTS // head.out_features)
    return _LinearLogProbs.apply(hidden, head.weight, head.bias, targets,
                                 dtype or _compute_dtype(hidden, head.weight), rows)
