"""sftctl.ops: the lowest layer, fused fp32-accumulating loss and label ops and thin modules.

- ``functional``: the op wrappers (``cross_entropy``, ``linear_cross_entropy``, ``sft_labels``,
  the optimizer step ``adamw_split_``, the gradient norm's ``sum_squares``) with their fake and autograd registrations over
  ``torch.ops.sftctl.*`` (implemented in the compiled ``sftctl._C``); ``linear_ce_ref``: the
  stock-PyTorch chunked linear cross-entropy (reference and fallback).
- ``split_master``: fp32 master weights as a bf16 weight plus its int16 low half
  (``split_fp32`` / ``join_fp32``, pure torch).
- ``modules``: ``nn.Module`` wrappers that only hold options and call ``functional``.

Importing this package loads the extension; without it the import raises ``ExtensionNotBuilt``
(an ``ImportError``) that says how to build it. Nothing here knows about training, data or
plugins.
"""

from __future__ import annotations

from .functional import (REDUCTIONS, CrossEntropyOutput, LinearCrossEntropyOutput, adamw_split_,
                         cross_entropy, linear_cross_entropy, sft_labels, sum_squares,
                         torch_linear_cross_entropy)
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .split_master import join_fp32, split_fp32

__all__ = ["REDUCTIONS", "CrossEntropyOutput", "cross_entropy", "sft_labels", "CrossEntropyLoss",
           "LinearCrossEntropyOutput", "linear_cross_entropy", "torch_linear_cross_entropy",
           "LinearCrossEntropyLoss", "adamw_split_", "sum_squares", "split_fp32", "join_fp32"]
