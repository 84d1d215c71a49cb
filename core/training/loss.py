"""The SFT loss: labels from the masking op, cross-entropy normalized over the optimizer step.

Design choices
- Two interchangeable implementations behind one function: ``fused`` calls the compiled
  ``sftctl.ops.sft_labels`` and ``sftctl.ops.cross_entropy`` (the default), ``torch`` is a plain
  PyTorch reference (``torch_sft_labels`` + ``F.cross_entropy`` in fp32). Tests check that both
  give the same labels, loss and gradients.
- The loss of a micro-batch is ``sum of token losses / normalizer`` where ``normalizer`` is the
  number of trainable targets in the *whole optimizer step* (all micro-batches, later all ranks),
  passed as a tensor so nothing syncs with the host. Summing the micro-batch losses then gives
  the exact token mean of the step: never a mean of per-batch means.
- Labels are aligned with the logits (``logits[b, t]`` predicts ``labels[b, t]``); there is no
  further shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def torch_sft_labels(input_ids: torch.Tensor, *, loss_mask: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None,
                     ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``sftctl.ops.sft_labels`` (semantics in csrc/kernels/params.h)."""
    B, T = input_ids.shape
    labels = torch.full_like(input_ids, ignore_index)  # [B, T]
    if T < 2:
        return labels, torch.zeros((), dtype=torch.long, device=input_ids.device)
    ok = torch.ones((B, T - 1), dtype=torch.bool, device=input_ids.device)  # [B, T-1]
    if attention_mask is not None:
        ok &= (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    if loss_mask is not None:
        ok &= loss_mask[:, 1:] != 0
    if position_ids is not None:
        ok &= position_ids[:, 1:] != 0  # a new document starts at t + 1
    if document_ids is not None:
        ok &= document_ids[:, 1:] == document_ids[:, :-1]
    labels[:, :-1] = torch.where(ok, input_ids[:, 1:], labels[:, :-1])
    return labels, ok.sum()


def sft_labels(batch, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B, T]`` and the trainable count (0-dim int64) of a ``data.Batch``."""
    kw = dict(loss_mask=batch.loss_mask, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, document_ids=batch.document_ids,
              ignore_index=IGNORE_INDEX)
    if impl == "torch":
        return torch_sft_labels(batch.input_ids, **kw)
    from .. import ops

    return ops.sft_labels(batch.input_ids, **kw)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | None,
               impl: str, *, reduction: str = "mean", grad_scale: torch.Tensor | None = None,
               consume_logits: bool = False, label_smoothing: float = 0.0,
               z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]``.

    ``reduction="mean"`` divides the token-loss sum by ``normalizer`` (0-dim fp32 tensor; a zero
    divisor gives 0); ``"sum"`` returns the sum (validation accumulates sums and counts).
    ``consume_logits`` (fused only): the gradient overwrites the logits buffer during forward,
    so no second [B*T, V] buffer exists; the trainer uses it because nothing else reads the
    logits of a training step.
    ``label_smoothing`` (eps) and ``z_loss`` (c) make each trainable token's loss
    ``(1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j) + c * lse**2`` (the op's definition,
    csrc/kernels/params.h); both impls compute exactly that. Validation passes neither.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)  # [B*T, V]
    targets = labels.reshape(-1)  # [B*T]
    if impl == "torch":
        x = flat.float()
        if label_smoothing or z_loss:
            total = _torch_loss_sum_with_options(x, targets, label_smoothing, z_loss)
        else:
            total = F.cross_entropy(x, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if reduction == "sum":
            return total
        return total / normalizer.clamp_min(1).to(total.dtype)
    from .. import ops

    return ops.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction=reduction,
                             normalizer=normalizer if reduction == "mean" else None,
                             grad_scale=grad_scale, inplace_backward=consume_logits,
                             label_smoothing=label_smoothing, z_loss=z_loss)


def _torch_loss_sum_with_options(x: torch.Tensor, targets: torch.Tensor, eps: float,
                                 z: float) -> torch.Tensor:
    """Summed loss of fp32 rows ``x [N, V]`` by the op's formula, written out term by term.

    ``(1 - eps)(lse - z_y) + eps (lse - mean_j z_j) + z lse^2`` regrouped as
    ``lse (1 + z lse) - (1 - eps) z_y - eps mean_j z_j``. Not F.cross_entropy(label_smoothing=...):
    its fp32 gradient loses the softmax tail where p_j ~ eps / V (measured: 1e-1 relative error per
    element at V=50257). Here autograd adds three exact-shaped terms: p_j (1 + 2 z lse) from
    logsumexp's exp(x - lse), -eps / V from the mean and the one-hot from the gather.
    """
    valid = targets != IGNORE_INDEX  # [N]
    lse = torch.logsumexp(x, dim=-1)  # [N]
    zy = x.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]  # [N]
    # lse enters once, so its gradient is one product p_j * (1 + 2 z lse), as in the kernel.
    row = (lse * (1.0 + z * lse) if z else lse) - (1.0 - eps) * zy
    if eps:
        row = row - eps * x.mean(dim=-1)
    # where, not boolean indexing: no host sync; ignored rows add (and receive) nothing.
    return torch.where(valid, row, 0.0).sum()


def kernel_name(impl: str, device: torch.device, fused_head: bool = False) -> str:
    """What ran, for the summary: e.g. ``sftctl._C cross_entropy (cpu)`` or ``torch``;
    ``fused_head``: the loss is ``linear_cross_entropy`` on the hidden states (``head.py``)."""
    if impl == "torch":
        return "torch (F.cross_entropy, fp32)"
    if fused_head:
        compiled = torch._C._dispatch_has_kernel_for_dispatch_key(
            "sftctl::linear_cross_entropy", "CUDA" if device.type == "cuda" else "CPU") \
            if torch._C._dispatch_has_kernel("sftctl::linear_cross_entropy") else False
        op = ("sftctl._C linear_cross_entropy" if compiled else
              "sftctl.ops linear_cross_entropy (chunked PyTorch reference)")
        return f"{op} + sft_labels ({device.type})"
    return f"sftctl._C cross_entropy + sft_labels ({device.type})"


def resolve_impl(impl: str, device: torch.device, has_kernel) -> tuple[str, str | None]:
    """The loss implementation that can run on ``device`` and, when it differs from the one
    asked for, why (the trainer logs it and counts it in the summary's ``fallbacks``).

    ``has_kernel(device_type) -> bool`` says whether sftctl._C has kernels for the device: an
    extension built without CUDA (no nvcc or cuBLAS headers at build time, or SFTCTL_FORCE_CPU)
    still trains on a GPU, through the PyTorch reference loss, but never silently.
    """
    if impl != "fused" or has_kernel(device.type):
        return impl, None
    return "torch", (f"sftctl._C has no {device.type.upper()} kernels (the extension was built "
                     f"without them); the loss runs on the PyTorch reference (F.cross_entropy "
                     f"in fp32: slower, and an fp32 copy of the logits). Rebuild with a CUDA "
                     f"toolkit present: pip install --no-build-isolation -e .")
