"""The seam between the trainer and a distributed strategy (torchrun: DDP, FSDP2).

Design choices
- The trainer never calls ``torch.distributed`` directly. It asks its ``Strategy`` for the rank
  and world size, to wrap/unwrap the model, to sum a tensor over ranks (the step's trainable-token
  count, so the loss is normalized by the global count), to skip gradient sync on all but the
  last micro-batch, and for the factor that cancels the gradient averaging of data parallelism.
- ``SingleProcess`` is the strategy when ``WORLD_SIZE`` is 1 (or unset). A torchrun launch with
  several processes needs a multi-process strategy (the DDP/FSDP2 issue plugs it in here:
  ``select_strategy`` is the only place that decides); until then it is a clear error rather
  than N independent runs writing the same directory.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError


class Strategy:
    """Single-process strategy; multi-process ones override the collective parts."""

    name = "none"

    def __init__(self):
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {requested!r} asked for, but CUDA is not available")
        return dev

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def grad_sync(self, model: torch.nn.Module, enabled: bool):
        """Context for one micro-batch's backward; ``enabled`` is False for all but the last."""
        return contextlib.nullcontext()

    @property
    def loss_factor(self) -> float:
        """Multiplier on the loss that cancels a gradient average over ranks (DDP divides by
        the world size; with a globally normalized loss the gradients must be summed)."""
        return 1.0

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


SingleProcess = Strategy


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def select_strategy(config) -> Strategy:
    """The strategy for this process (from torchrun's environment)."""
    world = world_size_from_env()
    if world <= 1:
        return SingleProcess()
    raise ConfigError(f"launched with WORLD_SIZE={world}: multi-process training (DDP/FSDP) is "
                      "not available in this version of sftctl; run a single process")
