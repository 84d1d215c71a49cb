"""Built-in plugin ``optimizers``: AdamW, Adam, SGD with momentum and Adafactor.

Design choices
- AdamW asks for PyTorch's fused implementation (one kernel for all parameters) where the device
  supports it (CUDA, and CPU in recent PyTorch); if the fused path is refused it falls back to
  the multi-tensor (foreach) path and says so. All optimizers keep fp32 state on fp32 weights.
- AdamW also steps split master weights (``--master-weights``: bf16 weight + int16 low half),
  through ``split_build``; the others leave a run with that option on fp32 weights.
- Builders receive parameter groups prepared by the trainer (no weight decay on 1-D parameters).
"""

from __future__ import annotations

import logging

import torch

from sftctl import OptimizerSpec, hookimpl

log = logging.getLogger("sftctl")


def build_adamw(params, oc, device):
    kw = dict(lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError) as e:
            log.warning("fused AdamW unavailable on %s (%s): using the foreach implementation",
                        device, e)
    return torch.optim.AdamW(params, foreach=True, **kw)


def build_adamw_split(params, oc, device, lows):
    """AdamW for split master weights (``--master-weights``): ``sftctl.ops.adamw_split_`` on the
    split Linear weights, torch's fused step (where the device allows) on the rest."""
    from sftctl.training.master_weights import SplitAdamW

    kw = dict(lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)
    fused = device.type in ("cuda", "cpu")
    return SplitAdamW(params, lows, fused=fused or None, foreach=None if fused else True, **kw)


def build_adam(params, oc, device):
    fused = device.type in ("cuda", "cpu")
    return torch.optim.Adam(params, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                            weight_decay=oc.weight_decay, fused=fused or None)


def build_sgd(params, oc, device):
    return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)


def build_adafactor(params, oc, device):
    return torch.optim.Adafactor(params, lr=oc.lr, weight_decay=oc.weight_decay)


@hookimpl
def sftctl_register_optimizers(register):
    register(OptimizerSpec("adamw", build_adamw, "AdamW (decoupled weight decay), fused where "
                                                 "the device allows",
                           split_build=build_adamw_split))
    register(OptimizerSpec("adam", build_adam, "Adam (L2 weight decay)"))
    register(OptimizerSpec("sgd", build_sgd, "SGD with momentum (--momentum)"))
    register(OptimizerSpec("adafactor", build_adafactor,
                           "Adafactor (factored second moments, low memory)"))
