"""Python API of sftctl's fused ops (``torch.ops.sftctl.*``, implemented in sftctl._C).

Design choices
- ``cross_entropy`` is called like ``torch.nn.functional.cross_entropy`` and returns the fp32
  loss, or ``CrossEntropyOutput(loss, lse, correct)`` when an extra output is asked for. Leading
  dimensions are flattened (logits ``[..., V]``, targets ``[...]``); per-row outputs come back in
  the targets' shape.
- The op is fused: its forward pass also writes the gradient of the reduced loss (the kernel has
  the softmax at hand, so backward is free). The registered autograd formula saves that gradient
  and, in backward, ``scale_grad_`` multiplies it by ``grad_output / grad_scale`` in place, which
  is a no-op (no pass, no host sync) in the common case ``loss.backward()`` or when the loss scale
  was passed up front as ``grad_scale``. A repeated backward through the same call
  (``retain_graph=True``) is still right: it rescales out of place from the first call's factor.
- The gradient is computed only when it can be needed (grad mode on and logits requiring grad).
- ``inplace_backward=True`` is the memory mode: the gradient overwrites the logits during forward,
  so no second N x V buffer exists. It *consumes the logits*: after the call they hold the
  gradient, and any other use of them (or a backward of an op that saved them) is wrong; autograd's
  version counter catches the latter. ``register_autograd`` refuses mutable schemas, so this mode
  is a ``torch.autograd.Function``.
- ``register_fake`` describes every op's outputs, so the ops trace under torch.compile and
  FakeTensor; they allocate exactly what the C++ side allocates.
- ``normalizer`` (mean only) and ``grad_scale`` are 0-dim tensors (numbers are accepted and put on
  the logits' device): the trainable-token count of a whole optimizer step and the loss scale,
  read on the device, never synchronized to the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._ext import load_extension
from .linear_ce_ref import (LinearCrossEntropyOutput, default_chunk_rows, resolve_compact,
                            torch_linear_cross_entropy)

load_extension()

__all__ = ["CrossEntropyOutput", "cross_entropy", "sft_labels", "REDUCTIONS",
           "linear_cross_entropy", "LinearCrossEntropyOutput", "torch_linear_cross_entropy"]

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


class CrossEntropyOutput(NamedTuple):
    """Loss plus the extra per-row outputs (None where not asked for); not differentiable."""

    loss: torch.Tensor
    lse: Optional[torch.Tensor]  # fp32 log-sum-exp of each row (0 for ignored rows)
    correct: Optional[torch.Tensor]  # bool: argmax == target (False for ignored rows)


# ---------------------------------------------------------------- fake (meta) implementations


@torch.library.register_fake("sftctl::cross_entropy")
def _cross_entropy_fake(logits, targets, normalizer, grad_scale, ignore_index, reduction,
                        label_smoothing, z_loss, softcap, return_lse, return_accuracy,
                        compute_grad):
    torch._check(logits.dim() == 2, lambda: "sftctl::cross_entropy: logits must be 2-D [N, V]")
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    loss = logits.new_empty((n,) if reduction == 0 else (), **f32)
    lse = logits.new_empty((n if return_lse else 0,), **f32)
    correct = logits.new_empty((n if return_accuracy else 0,), dtype=torch.bool)
    grad = logits.new_empty(tuple(logits.shape) if compute_grad else (0,))
    return loss, lse, correct, grad


@torch.library.register_fake("sftctl::cross_entropy_")
def _cross_entropy_inplace_fake(logits, targets, normalizer, grad_scale, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, return_lse, return_accuracy):
    loss, lse, correct, _ = _cross_entropy_fake(
        logits, targets, normalizer, grad_scale, ignore_index, reduction, label_smoothing,
        z_loss, softcap, return_lse, return_accuracy, False)
    return loss, lse, correct


@torch.library.register_fake("sftctl::scale_grad_")
def _scale_grad_fake(grad, grad_output, grad_scale):
    return None


@torch.library.register_fake("sftctl::sft_labels")
def _sft_labels_fake(input_ids, loss_mask, prompt_lengths, attention_mask, position_ids,
                     document_ids, ignore_index):
    labels = input_ids.new_empty(tuple(input_ids.shape), dtype=torch.int64)
    num = input_ids.new_empty((), dtype=torch.int64)
    return labels, num


# ---------------------------------------------------------------- autograd


def _apply_grad_output(ctx, buf, grad_output, grad_scale):
    """Gradient for this backward call from the fused buffer ``buf``.

    First call: ``scale_grad_`` in place (a no-op when grad_output == grad_scale), no copy.
    A later call through the same graph (retain_graph, gradcheck) finds ``buf`` already scaled by
    the first grad_output g1 and returns ``buf * (g / g1)`` out of place, leaving ``buf`` as it
    is; rows whose g1 was 0 were zeroed and cannot be recovered, which is an error.
    """
    if grad_output is None:
        grad_output = torch.zeros((), dtype=torch.float32, device=buf.device)
    grad_output = grad_output.float()
    if ctx.first_grad_output is None:
        torch.ops.sftctl.scale_grad_(buf, grad_output, grad_scale)
        ctx.first_grad_output = grad_output.detach().clone()
        return buf
    g1 = ctx.first_grad_output
    lost = (g1 == 0) & (grad_output != 0)
    if bool(lost.any()):  # rare path (a repeated backward); the host sync is acceptable here
        raise RuntimeError(
            "sftctl cross_entropy: a repeated backward through the same call needs rows whose "
            "first grad_output was 0; the fused gradient was scaled in place by that 0. Run the "
            "forward again instead of reusing the graph.")
    ratio = torch.where(g1 == 0, torch.zeros_like(g1), grad_output / torch.where(g1 == 0, 1.0, g1))
    if ratio.dim() == 1:
        ratio = ratio[:, None]  # [N, 1]: per-row factor (reduction none)
    return (buf.float() * ratio).to(buf.dtype)


def _ce_setup_context(ctx, inputs, output):
    grad_scale = inputs[3]
    grad_logits = output[3]
    # Only the loss is differentiable; without this, autograd would materialize a zero N x V
    # gradient for the unused grad_logits output on every backward.
    ctx.mark_non_differentiable(output[1], output[2], grad_logits)
    ctx.set_materialize_grads(False)
    ctx.has_grad_scale = grad_scale is not None
    ctx.first_grad_output = None
    if ctx.has_grad_scale:
        ctx.save_for_backward(grad_logits, grad_scale)
    else:
        ctx.save_for_backward(grad_logits)


def _ce_backward(ctx, grad_loss, grad_lse, grad_correct, grad_grad):
    saved = ctx.saved_tensors
    grad_logits = saved[0]
    grad_scale = saved[1] if ctx.has_grad_scale else None
    if grad_logits.numel() == 0 and grad_logits.dim() == 1:
        raise RuntimeError(
            "sftctl::cross_entropy was called with compute_grad=False, so it has no gradient to "
            "return; call it with compute_grad=True (sftctl.ops.cross_entropy decides this from "
            "logits.requires_grad and grad mode)")
    return (_apply_grad_output(ctx, grad_logits, grad_loss, grad_scale),) + (None,) * 11


torch.library.register_autograd("sftctl::cross_entropy", _ce_backward,
                                setup_context=_ce_setup_context)


class _CrossEntropyInplace(torch.autograd.Function):
    """Memory mode: the gradient is written over the logits during forward."""

    @staticmethod
    def forward(ctx, logits, targets, normalizer, grad_scale, ignore_index, reduction,
                label_smoothing, z_loss, softcap, return_lse, return_accuracy):
        loss, lse, correct = torch.ops.sftctl.cross_entropy_(
            logits, targets, normalizer, grad_scale, ignore_index, reduction, label_smoothing,
            z_loss, softcap, return_lse, return_accuracy)
        ctx.has_grad_scale = grad_scale is not None
        ctx.first_grad_output = None
        ctx.save_for_backward(logits, *((grad_scale,) if grad_scale is not None else ()))
        ctx.mark_non_differentiable(lse, correct)
        ctx.set_materialize_grads(False)
        return loss, lse, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_correct):
        saved = ctx.saved_tensors
        grad = saved[0]  # the logits buffer, now holding the gradient
        grad_scale = saved[1] if ctx.has_grad_scale else None
        return (_apply_grad_output(ctx, grad, grad_loss, grad_scale),) + (None,) * 10


# ---------------------------------------------------------------- public API


def _as_scalar_tensor(value, name: str, device: torch.device) -> Optional[torch.Tensor]:
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must be a 0-dim tensor or a number, got {type(value).__name__}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *,
                  normalizer=None, z_loss: float = 0.0, softcap: Optional[float] = None,
                  return_lse: bool = False, return_accuracy: bool = False,
                  inplace_backward: bool = False, grad_scale=None):
    """Fused cross-entropy over the last dimension of ``logits`` (fp32, bf16 or fp16).

    Like ``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=...,
    reduction=..., label_smoothing=...)`` with fp32 accumulation, plus:

    - ``normalizer``: 0-dim tensor dividing the summed loss for ``reduction="mean"`` instead of
      the number of non-ignored targets (e.g. the trainable tokens of the whole optimizer step
      across accumulation steps and ranks). A zero divisor gives loss 0 and a zero gradient.
    - ``z_loss``: adds ``z_loss * lse**2`` per row. ``softcap``: logits ``c * tanh(x / c)``.
    - ``return_lse`` / ``return_accuracy``: also return per-row log-sum-exp and argmax == target.
    - ``inplace_backward``: memory mode, the gradient overwrites ``logits`` (consumed).
    - ``grad_scale``: a loss scale the gradient is pre-multiplied by; ``backward`` with
      ``grad_output == grad_scale`` then needs no extra pass.
    Returns the fp32 loss (0-dim, or the targets' shape for ``reduction="none"``), or a
    ``CrossEntropyOutput`` when ``return_lse`` or ``return_accuracy`` is set.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape [..., V]")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits shape "
                         f"{tuple(logits.shape)} without its last (class) dimension")
    red = REDUCTIONS[reduction]
    v = logits.shape[-1]
    flat_logits = logits if logits.dim() == 2 else logits.reshape(-1, v)
    flat_targets = targets.reshape(-1)
    normalizer = _as_scalar_tensor(normalizer, "normalizer", logits.device)
    grad_scale = _as_scalar_tensor(grad_scale, "grad_scale", logits.device)
    cap = 0.0 if softcap is None else float(softcap)
    args = (flat_targets, normalizer, grad_scale, int(ignore_index), red, float(label_smoothing),
            float(z_loss), cap, bool(return_lse), bool(return_accuracy))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and need_grad:
        if logits.is_leaf:
            raise ValueError(
                "inplace_backward=True overwrites logits with their gradient, but logits is a "
                "leaf tensor that requires grad (a parameter?); pass the non-leaf output of the "
                "model's head, or use inplace_backward=False")
        # reshape of contiguous logits is a view, so the gradient lands in the caller's buffer;
        # if reshape had to copy, the copy is consumed instead (still correct, not memory-lean).
        loss, lse, correct = _CrossEntropyInplace.apply(flat_logits, *args)
    else:
        loss, lse, correct, _ = torch.ops.sftctl.cross_entropy(flat_logits, *args, need_grad)
    if red == 0:
        loss = loss.view(targets.shape)
    if not (return_lse or return_accuracy):
        return loss
    return CrossEntropyOutput(loss,
                              lse.view(targets.shape) if return_lse else None,
                              correct.view(targets.shape) if return_accuracy else None)


def sft_labels(input_ids: torch.Tensor, *, loss_mask=None, prompt_lengths=None,
               attention_mask=None, position_ids=None, document_ids=None,
               ignore_index: int = -100):
    """Next-token targets for causal-LM SFT, aligned with the logits (no further shift).

    ``labels[b, t] = input_ids[b, t + 1]`` when token t + 1 is a trainable (response, non-padding)
    token of the same document as token t, else ``ignore_index``; the last column is always
    ignored. Returns ``(labels [B, T] int64, num_trainable 0-dim int64 tensor)``. Masks may be
    bool or integer; ``prompt_lengths`` is ``[B]``; packed rows give ``position_ids`` (a new
    document starts where it is 0) and/or ``document_ids``.
    """
    return torch.ops.sftctl.sft_labels(input_ids, loss_mask, prompt_lengths, attention_mask,
                                       position_ids, document_ids, int(ignore_index))


# ---------------------------------------------------------------- linear + cross-entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, normalizer=None,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         logit_scale: Optional[float] = None, return_lse: bool = False,
                         grad_scale=None, chunk_rows: Optional[int] = None,
                         compact: Optional[bool] = None):
    """Cross-entropy of ``logits = logit_scale * (hidden @ weight.T + bias)`` without ever
    holding the [N, V] logits: the head matmul and the loss in one op, chunked over rows.

    Same semantics as ``cross_entropy(logits, targets, ...)`` (label_smoothing, z_loss, softcap
    ``c * tanh(z / c)`` applied after the scale, normalizer, grad_scale), fp32 logits and fp32
    accumulation. ``hidden [..., d]``, ``targets [...]``, ``weight [V, d]``, ``bias [V]``; the
    GEMMs run in hidden's dtype (under autocast: the autocast dtype), the weight is converted
    when it differs (fp32 master weights), and dweight comes back in weight's dtype.

    - ``chunk_rows``: rows per chunk (default: as many as keep an fp32 chunk of logits <= 1 GiB).
    - ``compact``: drop ignored rows before the matmul (needs a host sync for the count). Default
      (None): on, except while a CUDA graph is being captured; False computes every row.
    - ``return_lse``: also return the fp32 per-row log-sum-exp (0 for ignored rows; not
      differentiable) as ``LinearCrossEntropyOutput(loss, lse)``.
    Returns the fp32 loss (0-dim, or the targets' shape for ``reduction="none"``).
    """
    if isinstance(hidden, torch.Tensor) and hidden.device.type in ("cuda", "cpu"):
        dev_type = hidden.device.type
        if torch.is_autocast_enabled(dev_type):
            hidden = hidden.to(torch.get_autocast_dtype(dev_type))
    return torch_linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, normalizer=normalizer, z_loss=z_loss, softcap=softcap,
        logit_scale=logit_scale, return_lse=return_lse, grad_scale=grad_scale,
        chunk_rows=chunk_rows, compact=compact)
