"""``nn.Module`` wrappers of the fused ops (thin: all work happens in ``sftctl.ops``).

Design choice: options are fixed at construction like ``torch.nn.CrossEntropyLoss``; the per-step
tensors (``normalizer``, ``grad_scale``) are forward arguments because they change every step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as ops

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`sftctl.ops.cross_entropy` (same options, same outputs)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False,
                 return_accuracy: bool = False, inplace_backward: bool = False):
        super().__init__()
        if reduction not in ops.REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(ops.REDUCTIONS)}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.return_accuracy = return_accuracy
        self.inplace_backward = inplace_backward

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                normalizer: Optional[torch.Tensor] = None,
                grad_scale: Optional[torch.Tensor] = None):
        return ops.cross_entropy(
            logits, targets, self.ignore_index, self.reduction, self.label_smoothing,
            normalizer=normalizer, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse, return_accuracy=self.return_accuracy,
            inplace_backward=self.inplace_backward, grad_scale=grad_scale)

    def extra_repr(self) -> str:
        opts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for name in ("label_smoothing", "z_loss", "softcap", "return_lse", "return_accuracy",
                     "inplace_backward"):
            value = getattr(self, name)
            if value:
                opts.append(f"{name}={value}")
        return ", ".join(opts)


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`sftctl.ops.linear_cross_entropy`: options fixed at construction; the
    head's weight (and bias) are forward arguments, so a tied or adapter-wrapped head passes
    whatever tensor it uses."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", *,
                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                 return_lse: bool = False, chunk_rows: Optional[int] = None,
                 compact: Optional[bool] = None):
        super().__init__()
        if reduction not in ops.REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(ops.REDUCTIONS)}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.chunk_rows = chunk_rows
        self.compact = compact

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None, normalizer=None, grad_scale=None):
        return ops.linear_cross_entropy(
            hidden, weight, targets, bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            normalizer=normalizer, z_loss=self.z_loss, softcap=self.softcap,
            logit_scale=self.logit_scale, return_lse=self.return_lse, grad_scale=grad_scale,
            chunk_rows=self.chunk_rows, compact=self.compact)

    def extra_repr(self) -> str:
        opts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for name in ("label_smoothing", "z_loss", "softcap", "logit_scale", "return_lse",
                     "chunk_rows", "compact"):
            value = getattr(self, name)
            if value is not None and value is not False and value != 0.0:
                opts.append(f"{name}={value}")
        return ", ".join(opts)
