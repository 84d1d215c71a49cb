"""What optimizer and scheduler plugins register, and the parameter groups the trainer gives them.

Design choices
- Each kind is a small frozen dataclass holding a name, a callable and documentation; plugins hand
  them to the ``register`` callback of ``sftctl_register_optimizers`` /
  ``sftctl_register_schedulers``, and the plugin manager stamps the registering plugin's name.
- Weight decay is decided here, not by the optimizer plugins: biases and norm weights (1-D
  parameters) are never decayed; frozen parameters never reach the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class OptimizerSpec:
    """``build(params, optim_config, device) -> torch.optim.Optimizer``.

    ``params`` are parameter groups (list of dicts with "params" and "weight_decay"), so weight
    decay is applied only where the trainer decides (not to biases and norms).
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    plugin: str | None = None


@dataclass(frozen=True)
class SchedulerSpec:
    """``build(optimizer, total_steps, warmup_steps, optim_config) -> LRScheduler``.

    The scheduler is stepped once per optimizer step and must have a ``state_dict`` (a
    ``LambdaLR`` with a picklable-free lambda is fine: its state is the step count).
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    plugin: str | None = None


def param_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed (matrices) and not decayed (1-D)."""
    decay, no_decay = [], []
    for _name, p in named_parameters:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
