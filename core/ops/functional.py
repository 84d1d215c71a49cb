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
- ``linear_cross_entropy`` fuses the LM head matmul with the loss and never holds the [N, V]
  logits; its design notes are next to its registrations below.
- ``register_fake`` describes every op's outputs, so the ops trace under torch.compile and
  FakeTensor; they allocate exactly what the C++ side allocates.
- ``normalizer`` (mean only) and ``grad_scale`` are 0-dim tensors (numbers are accepted and put on
  the logits' device): the trainable-token count of a whole optimizer step and the loss scale,
  read on the device, never synchronized to the host.
- ``adamw_split_`` is the optimizer step on fp32 master weights kept as bf16 ``weight`` + int16
  ``low`` (``split_master``): one fused pass per parameter list, in place; its fake
  implementation is a no-op, so it traces.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from .._ext import load_extension
from .linear_ce_ref import LinearCrossEntropyOutput, torch_linear_cross_entropy
from .linear_ce_ref import _check_args as _check_lce_args

load_extension()

__all__ = ["CrossEntropyOutput", "cross_entropy", "sft_labels", "REDUCTIONS",
           "linear_cross_entropy", "LinearCrossEntropyOutput", "torch_linear_cross_entropy",
           "adamw_split_"]

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


@torch.library.register_fake("sftctl::adamw_split_")
def _adamw_split_fake(weights, lows, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
                      weight_decay, step, grad_scale, found_inf, nonfinite=None):
    return None


@torch.library.register_fake("sftctl::sum_squares")
def _sum_squares_fake(tensors):
    torch._check(len(tensors) > 0, lambda: "sftctl::sum_squares: tensors is empty")
    return tensors[0].new_empty((), dtype=torch.float32)


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
#
# Design (issue 14): a device-generic chunk driver in csrc/binding.cpp runs over row chunks of
# the (compacted) hidden states: GEMM into an fp32 logits chunk (aten::mm.dtype with fp32 output
# on CUDA, fp32 operands on the CPU) -> the fused cross-entropy kernel on that chunk, which writes
# per-row loss and lse and the logits' gradient straight in the GEMM dtype (bf16/fp16, rounded
# once, already multiplied by the reduction factor, logit_scale and any per-row factor) ->
# dhidden = dlogits @ W and dweight = dlogits^T @ h with fp32 accumulation. A chunk is the unit
# of the two gradient GEMMs: its logits gradient (GEMM dtype) is kept whole while its fp32
# logits go through in pieces of <= 512 MiB (each piece lives from its GEMM to the kernel).
# Default: all target rows in one chunk when their gradient fits 1.5 GiB plus the fp32 dweight
# accumulator that several chunks would need for a 16-bit weight (V * d * 4 bytes), else chunks
# of 1.5 GiB of gradient (6,272 rows at V = 128256 in bf16) with that accumulator; either way
# gradient + accumulator stay within 1.5 GiB + V * d * 4. On CUDA the 16-bit dhidden (every
# chunk) and the one-chunk dweight are written by cuBLAS from its fp32 accumulators, with
# torch's reduced-precision split-K reduction switched off while the op runs (the setting is
# restored after): the same bits as an fp32 GEMM rounded once, without an fp32 temporary and a
# rounding copy (2.2 ms of a 9 ms dweight GEMM on an H200: bench/profile_lce.py). The CPU
# computes in fp32 and rounds through <= 256 MiB pieces. Why this and not a fused GEMM+softmax
# kernel: cuBLAS GEMMs are already at the matmul floor, and the cross-entropy kernel is
# memory-bound and tuned (bench/NOTES_cuda.md); the round trip through HBM (fp32 write + read,
# 16-bit gradient write + read) costs ~4 % of the GEMM time at d = 4096.
# - mean/sum: the gradients are computed in forward (the loss is a scalar); backward only rescales
#   them by grad_output / grad_scale (scale_grad_, a no-op for loss.backward()).
# - none: forward computes losses only; backward reruns the chunks with grad_output as a per-row
#   factor (row_scale) of the gradient.
# - Compaction (ignored rows dropped before the GEMMs) needs a host sync for the count; the op
#   does it in C++ at run time unless the current CUDA stream is capturing a graph, so the op
#   stays capturable (and traceable: the outputs never depend on the count).
# - dweight: accumulated in fp32 by cuBLAS itself (C = the fp32 accumulator, beta = 1, through
#   aten::baddbmm.dtype_out: aten::addmm.dtype insists on a 16-bit C). With an fp32 weight (master
#   weights under autocast) that accumulator is the returned gradient; with a 16-bit weight it is
#   an extra [V, d] fp32 buffer (2 GiB at V = 128256, d = 4096) rounded once at the end. If a
#   torch refuses the baddbmm form, the driver warns once and adds fp32 GEMM pieces
#   (<= 256 MiB temporaries) instead.
# - No dweight work (no GEMM) when weight does not require grad, no dhidden work when hidden does
#   not; the profiler test counts the GEMMs.

_LCE_KERNELS = {
    dev: torch._C._dispatch_has_kernel_for_dispatch_key("sftctl::linear_cross_entropy", key)
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
_LCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lce_fallback_warned: set = set()


@torch.library.register_fake("sftctl::linear_cross_entropy")
def _lce_fake(hidden, weight, targets, bias, normalizer, grad_scale, row_scale, ignore_index,
              reduction, label_smoothing, z_loss, softcap, logit_scale, return_lse, grad_hidden,
              grad_weight, grad_bias, compact, chunk_rows):
    torch._check(hidden.dim() == 2, lambda: "sftctl::linear_cross_entropy: hidden must be 2-D")
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = hidden.new_empty((n,) if reduction == 0 else (), **f32)
    lse = hidden.new_empty((n if return_lse else 0,), **f32)
    dh = hidden.new_empty(tuple(hidden.shape) if grad_hidden else (0,))
    dw = weight.new_empty(tuple(weight.shape) if grad_weight else (0,))
    db = (bias.new_empty((bias.shape[0] if grad_bias else 0,)) if bias is not None
          else hidden.new_empty((0,), **f32))
    return loss, lse, dh, dw, db


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, targets, bias, normalizer, grad_scale, row_scale, ignore_index, reduction,
     label_smoothing, z_loss, softcap, logit_scale, return_lse, grad_hidden, grad_weight,
     grad_bias, compact, chunk_rows) = inputs
    loss, lse, dh, dw, db = output
    ctx.mark_non_differentiable(lse, dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.first_grad_output = None
    ctx.flags = (grad_hidden, grad_weight, grad_bias)
    if reduction != 0:
        ctx.has_grad_scale = grad_scale is not None
        ctx.save_for_backward(dh, dw, db, *((grad_scale,) if grad_scale is not None else ()))
    else:
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap, logit_scale, compact,
                    chunk_rows)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, targets, *((bias,) if bias is not None else ()))


def _lce_backward(ctx, grad_loss, grad_lse, grad_dh, grad_dw, grad_db):
    n_in = 19
    if grad_loss is None:
        return (None,) * n_in
    need = ctx.needs_input_grad
    if ctx.reduction == 0:
        hidden, weight, targets = ctx.saved_tensors[:3]
        bias = ctx.saved_tensors[3] if ctx.has_bias else None
        ii, eps, zl, cap, ls, compact, chunk_rows = ctx.opts
        _, _, dh, dw, db = torch.ops.sftctl.linear_cross_entropy(
            hidden, weight, targets, bias, None, None, grad_loss.float().contiguous(), ii, 0,
            eps, zl, cap, ls, False, bool(need[0]), bool(need[1]),
            bool(need[3] and bias is not None), compact, chunk_rows)
        return ((dh if need[0] else None), (dw if need[1] else None), None,
                (db if need[3] and bias is not None else None)) + (None,) * (n_in - 4)
    saved = ctx.saved_tensors
    dh, dw, db = saved[:3]
    grad_scale = saved[3] if ctx.has_grad_scale else None
    flags = ctx.flags
    for want, have, name in ((need[0], flags[0], "hidden"), (need[1], flags[1], "weight"),
                             (need[3], flags[2], "bias")):
        if want and not have:
            raise RuntimeError(
                f"sftctl::linear_cross_entropy was called without grad_{name}=True, so it has no "
                f"gradient for {name}; sftctl.ops.linear_cross_entropy decides this from "
                f"{name}.requires_grad and grad mode")
    go = grad_loss.float()
    bufs = [dh if flags[0] else None, dw if flags[1] else None, db if flags[2] else None]
    if ctx.first_grad_output is None:
        for b in bufs:
            if b is not None:
                torch.ops.sftctl.scale_grad_(b.view(-1, b.shape[-1]) if b.dim() else b, go,
                                             grad_scale)
        ctx.first_grad_output = go.detach().clone()
        out = bufs
    else:  # a repeated backward (retain_graph): rescale out of place from the first call
        g1 = ctx.first_grad_output
        if bool((g1 == 0) & (go != 0)):
            raise RuntimeError(
                "sftctl linear_cross_entropy: a repeated backward needs the gradient that the "
                "first backward scaled in place by grad_output 0; run the forward again")
        ratio = torch.where(g1 == 0, torch.zeros_like(g1), go / torch.where(g1 == 0, 1.0, g1))
        out = [None if b is None else (b.float() * ratio).to(b.dtype) for b in bufs]
    return ((out[0] if need[0] else None), (out[1] if need[1] else None), None,
            (out[2] if need[3] else None)) + (None,) * (n_in - 4)


torch.library.register_autograd("sftctl::linear_cross_entropy", _lce_backward,
                                setup_context=_lce_setup_context)


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
    GEMMs run in hidden's dtype (under autocast: the autocast dtype); weight and bias are
    converted to it when they differ (fp32 master weights), and each gradient comes back in its
    input's dtype (dweight of an fp32 weight is accumulated in fp32 directly).

    - ``chunk_rows``: rows per chunk, the unit of the dhidden/dweight GEMMs whose logits
      gradient is kept in the GEMM dtype (default: all rows when their gradient fits 1.5 GiB
      plus, for a 16-bit weight, the [V, d] fp32 dweight accumulator one chunk avoids; else
      chunks of 1.5 GiB of gradient).
    - ``compact``: drop ignored rows before the matmul (a host sync for their count). Default
      (None, or True): on, except while the current CUDA stream captures a graph; False computes
      every row (ignored rows contribute exactly 0) and never syncs. An input that is already
      compacted (no ignored target) costs that one count and no copy.
    - ``return_lse``: also return the fp32 per-row log-sum-exp (0 for ignored rows; not
      differentiable) as ``LinearCrossEntropyOutput(loss, lse)``.
    - ``grad_scale``: a loss scale the gradients are pre-multiplied by (see ``cross_entropy``).
    Returns the fp32 loss (0-dim, or the targets' shape for ``reduction="none"``).
    float64 inputs, and devices sftctl._C has no kernels for, use ``torch_linear_cross_entropy``.
    With fp32 hidden states the GEMMs are fp32 GEMMs and follow torch's float32 matmul precision
    (TF32 when ``torch.set_float32_matmul_precision("high")`` is set, as ``F.linear`` would).
    """
    if isinstance(hidden, torch.Tensor) and hidden.device.type in ("cuda", "cpu"):
        dev_type = hidden.device.type
        if torch.is_autocast_enabled(dev_type):
            hidden = hidden.to(torch.get_autocast_dtype(dev_type))
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              normalizer=normalizer, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
              return_lse=return_lse, grad_scale=grad_scale, chunk_rows=chunk_rows,
              compact=compact)
    _check_lce_args(hidden, weight, targets, bias, reduction)
    dev_type = hidden.device.type
    if (not _LCE_KERNELS.get(dev_type, False) or hidden.dtype not in _LCE_DTYPES
            or weight.dtype not in _LCE_DTYPES
            or (bias is not None and bias.dtype not in _LCE_DTYPES)):
        if hidden.dtype != torch.float64 and dev_type not in _lce_fallback_warned:
            _lce_fallback_warned.add(dev_type)
            warnings.warn(f"sftctl.ops.linear_cross_entropy: sftctl._C has no kernel for "
                          f"{dev_type} tensors of dtype {hidden.dtype}/{weight.dtype}; using "
                          "the stock-PyTorch chunked implementation (torch_linear_cross_entropy)",
                          stacklevel=2)
        return torch_linear_cross_entropy(hidden, weight, targets, bias, **kw)
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows}")
    red = REDUCTIONS[reduction]
    d = hidden.shape[-1]
    flat_h = hidden.reshape(-1, d)
    flat_t = targets.reshape(-1)
    normalizer = _as_scalar_tensor(normalizer, "normalizer", hidden.device)
    grad_scale = _as_scalar_tensor(grad_scale, "grad_scale", hidden.device)
    grad_on = torch.is_grad_enabled()
    fused = red != 0  # mean/sum: gradients in forward; none: recomputed in backward
    gh = fused and grad_on and hidden.requires_grad
    gw = fused and grad_on and weight.requires_grad
    gb = fused and grad_on and bias is not None and bias.requires_grad
    loss, lse, _, _, _ = torch.ops.sftctl.linear_cross_entropy(
        flat_h, weight, flat_t, bias, normalizer, grad_scale, None, int(ignore_index), red,
        float(label_smoothing), float(z_loss), 0.0 if softcap is None else float(softcap),
        1.0 if logit_scale is None else float(logit_scale), bool(return_lse), gh, gw, gb,
        0 if compact is False else 1, 0 if chunk_rows is None else int(chunk_rows))
    if red == 0:
        loss = loss.view(targets.shape)
    if return_lse:
        return LinearCrossEntropyOutput(loss, lse.view(targets.shape))
    return loss


# ---------------------------------------------------------------- optimizer step


def adamw_split_(weights, lows, grads, exp_avgs, exp_avg_sqs, *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, step: int, grad_scale=None,
                 found_inf=None, nonfinite=None) -> None:
    """One AdamW step, in place, on fp32 master weights, each held either split as
    ``(weights[i], lows[i])`` (bf16 and int16, see ``sftctl.ops.split_master``) with a bf16
    gradient, or whole as an fp32 ``weights[i]`` with an fp32 gradient and ``lows[i]`` ``None``
    (or an empty int16 tensor); both layouts may be mixed in one call (one launch on CUDA).
    Moments are fp32.

    Per element, in fp32 and in the order of ``torch.optim.AdamW(fused=True)``: the master is
    decoded exactly, the gradient divided by ``grad_scale`` (when given), then decoupled weight
    decay, the moment updates and the bias-corrected step; a split result is split back into the
    two halves. ``step`` counts this step (1 for the first). ``grad_scale`` and ``found_inf`` are
    1-element float32 tensors on the parameters' device (a number is accepted for
    ``grad_scale``); when ``found_inf`` is nonzero nothing is written. Both are read on the
    device, so a CUDA step never synchronizes. ``nonfinite`` (optional, a 1-element float32
    tensor on that device) is set to 1 when the step writes a weight whose bf16 value (for a
    whole weight: the value autocast would cast it to) is inf or NaN, and left as it is
    otherwise (it is never cleared; a skipped step writes nothing). All lists have one entry
    per parameter; every tensor is contiguous and has its parameter's shape. Runs under
    ``no_grad`` (the weights are usually parameters that require grad).
    """
    weights, lows, grads = list(weights), list(lows), list(grads)
    lows = [torch.empty(0, dtype=torch.int16, device=w.device) if lo is None else lo
            for w, lo in zip(weights, lows)] + lows[len(weights):]  # extra: the op names them
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
    if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
        device = weights[0].device if weights else torch.device("cpu")
        grad_scale = _as_scalar_tensor(grad_scale, "grad_scale", device)
    with torch.no_grad():
        torch.ops.sftctl.adamw_split_(weights, lows, grads, exp_avgs, exp_avg_sqs, float(lr),
                                      float(beta1), float(beta2), float(eps),
                                      float(weight_decay), int(step), grad_scale, found_inf,
                                      nonfinite)


# ---------------------------------------------------------------- gradient norm


def sum_squares(tensors) -> torch.Tensor:
    """Sum of the squares of every element of ``tensors`` (fp32, bf16 or fp16, any mix, one
    device), as a 0-dim fp32 tensor on that device: the squared global 2-norm that gradient
    clipping needs, in one read of each tensor and without a host sync. Elements are widened to
    fp32 and squared in fp32; partial sums are carried in fp64 in a fixed order, so the result is
    deterministic and within a few hundred fp32 ulps of float64 whatever the element count. An
    inf or NaN element makes it inf or NaN. Non-contiguous tensors are read through a contiguous
    copy; an empty list gives 0 on the CPU."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return torch.ops.sftctl.sum_squares(tensors)
