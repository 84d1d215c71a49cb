"""sftctl.ops: the lowest layer, fused fp32-accumulating loss and label ops and thin modules.

- ``functional``: the op wrappers (``cross_entropy``, ``linear_cross_entropy``, ``sft_labels``)
  with their fake and autograd registrations over ``torch.ops.sftctl.*`` (implemented in the
  compiled ``sftctl._C``); ``linear_ce_ref``: the stock-PyTorch chunked linear cross-entropy
  (reference and fallback).
- ``modules``: ``nn.Module`` wrappers that only hold options and call ``functional``.

Importing this package loads the extension; without it the import raises ``ExtensionNotBuilt``
(an ``ImportError``) that says how to build it. Nothing here knows about training, data or
plugins.
"""

from __future__ import annotations

from .functional import (REDUCTIONS, CrossEntropyOutput, LinearCrossEntropyOutput,
                         cross_entropy, linear_cross_entropy, sft_labels,
                         torch_linear_cross_entropy)
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["REDUCTIONS", "CrossEntropyOutput", "cross_entropy", "sft_labels", "CrossEntropyLoss",
           "LinearCrossEntropyOutput", "linear_cross_entropy", "torch_linear_cross_entropy",
           "LinearCrossEntropyLoss"]
