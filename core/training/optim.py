"""What optimizer and scheduler plugins register, and the parameter groups the trainer gives them.

Design choices
- Each kind is a small frozen dataclass holding a name, a callable and documentation; plugins hand
  them to the ``register`` callback of ``sftctl_register_optimizers`` /
  ``sftctl_register_schedulers``, and the plugin manager stamps the registering plugin's name.
- Weight decay is decided here, not by the optimizer plugins: biases and norm weights (1-D
  parameters) are never decayed; frozen parameters never reach the optimizer.
- Plugin options reach a builder as an argument, opt-in with ``uses_options=True`` (as for
  ``DatasetFormat``): builders never read module globals, so a builder sees the options of the
  run it builds for, whoever configured the process before. The trainer calls ``create``, which
  passes them or not; builders written before the option keep their three/four arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """``build(params, optim_config, device) -> torch.optim.Optimizer``.

    ``params`` are parameter groups (list of dicts with "params" and "weight_decay"), so weight
    decay is applied only where the trainer decides (not to biases and norms). ``optim_config``
    is the run's ``optim`` section (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``
    ...), ``device`` the ``torch.device`` the model is on. With ``uses_options=True`` it is
    called as ``build(params, optim_config, device, options)``, ``options`` being the run's
    plugin options (``config.options``, dotted names such as ``"myplugin.beta3"``).
    ``split_build`` (optional, same arguments plus ``lows`` before ``options``) builds an
    optimizer that can step split master weights (bf16 weight + int16 low half); without it
    ``--master-weights auto`` keeps fp32 weights for this optimizer.
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    uses_options: bool = False
    plugin: str | None = None
    split_build: Callable[..., Any] | None = None

    def create(self, params, optim_config, device, options: Mapping[str, Any] | None = None):
        if self.uses_options:
            return self.build(params, optim_config, device, dict(options or {}))
        return self.build(params, optim_config, device)

    def create_split(self, params, optim_config, device, lows: dict,
                     options: Mapping[str, Any] | None = None):
        """The optimizer for a run with split master weights (``--master-weights``):
        ``split_build(params, optim_config, device, lows[, options])``, ``lows`` mapping each
        bf16 split parameter to the int16 low half of its fp32 master, which the optimizer
        keeps and updates (``sftctl.training.master_weights.SplitAdamW`` does). An optimizer
        that also has ``flag_nonfinite_writes(flag) -> covered parameters`` (SplitAdamW does)
        checks the weights it writes itself, and the trainer's after-update check skips those."""
        if self.split_build is None:
            raise ValueError(f"optimizer {self.name!r} registers no split_build")
        if self.uses_options:
            return self.split_build(params, optim_config, device, lows, dict(options or {}))
        return self.split_build(params, optim_config, device, lows)


@dataclass(frozen=True)
class SchedulerSpec:
    """``build(optimizer, total_steps, warmup_steps, optim_config) -> LRScheduler``.

    ``total_steps``: the optimizer steps of the whole run; ``warmup_steps``: resolved from
    ``--warmup-steps``/``--warmup-ratio``. The scheduler is stepped once per optimizer step and
    must have a ``state_dict`` (a ``LambdaLR`` is fine: its state is the step count). With
    ``uses_options=True`` it is called with the run's plugin options as a fifth argument.
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    uses_options: bool = False
    plugin: str | None = None

    def create(self, optimizer, total_steps: int, warmup_steps: int, optim_config,
               options: Mapping[str, Any] | None = None):
        if self.uses_options:
            return self.build(optimizer, total_steps, warmup_steps, optim_config,
                              dict(options or {}))
        return self.build(optimizer, total_steps, warmup_steps, optim_config)


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


def clip_divisor(total_norm, max_norm: float):
    """What the gradients are divided by to clip them to ``max_norm``: ``max(1, (norm + 1e-6) /
    max_norm)``, a device scalar (no host sync), the reciprocal of the factor
    ``torch.nn.utils.clip_grad_norm_`` multiplies by. A fused optimizer step takes it as its
    ``grad_scale`` (the trainer folds clipping into the step that way)."""
    return torch.clamp((total_norm.to(torch.float32) + 1e-6) / max_norm, min=1.0)
