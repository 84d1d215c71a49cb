"""Built-in plugin ``schedulers``: cosine, linear and constant LR schedules with linear warmup.

Design choices
- Each schedule is a ``LambdaLR`` over a module-level function bound with ``functools.partial``,
  so its state (the step count) is saved and restored by ``state_dict`` and the factor at any
  step is a pure function of (step, total, warmup): a resumed run gets the same learning rates.
- Step s (0-based, the s-th optimizer step) uses factor (s + 1) / warmup during warmup, then
  decays from 1 at s = warmup to ``min_lr_ratio`` at the last step.
"""

from __future__ import annotations

import functools
import math

from torch.optim.lr_scheduler import LambdaLR

from sftctl import SchedulerSpec, hookimpl


def lr_factor(step: int, *, kind: str, total: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    p = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}")


def _builder(kind: str):
    def build(optimizer, total_steps, warmup_steps, oc):
        fn = functools.partial(lr_factor, kind=kind, total=total_steps, warmup=warmup_steps,
                               min_ratio=oc.min_lr_ratio)
        return LambdaLR(optimizer, fn)
    return build


@hookimpl
def sftctl_register_schedulers(register):
    register(SchedulerSpec("cosine", _builder("cosine"),
                           "linear warmup, then cosine decay to min_lr_ratio"))
    register(SchedulerSpec("linear", _builder("linear"),
                           "linear warmup, then linear decay to min_lr_ratio"))
    register(SchedulerSpec("constant", _builder("constant"), "linear warmup, then constant"))
