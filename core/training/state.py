"""The run's saveable state, one bundle that the checkpointer saves and restores in one place.

Design choices
- ``RunState`` holds everything a resumable checkpoint must bring back: the model as it is
  trained (possibly wrapped by DDP/FSDP), the optimizer, the LR scheduler, the grad scaler and
  ``TrainState``, the counters (step, epoch, position in the epoch, token counts, metrics
  history, non-finite counters). RNG states are captured when the dict is built. The data order
  is a pure function of (seed, epoch), so the position in the epoch is the whole data state.
- ``state_dict`` / ``load_state_dict`` are the run's only serialization, tensors and plain types
  only (``torch.load(weights_only=True)`` reads it back). With ``sharded=True`` the model and
  optimizer are left out: a sharded strategy (FSDP) writes and reads those itself.
- ``TrainState`` is updated in place on restore, so the objects that hold it (the non-finite
  guard, the run context seen by plugins) never see a stale copy.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters and history of a run: what, with the model and optimizer, makes it resumable."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0                # current epoch
    micro_in_epoch: int = 0       # micro-batches of the current epoch already consumed
    tokens_total: int = 0         # input tokens processed (padding excluded), this rank
    trainable_total: int = 0      # trainable targets seen (global), known at log steps
    examples_total: int = 0
    train_time_s: float = 0.0     # wall time spent in training steps (over resumes)
    history: list[dict] = field(default_factory=list)
    nonfinite_skipped: int = 0    # steps not applied because of a non-finite loss/grad norm
    nonfinite_in_a_row: int = 0
    nonfinite_last_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        """Replace every field (in place); an unknown key is an error."""
        known = {f.name for f in fields(self)}
        for k in d:
            if k not in known:
                raise ValueError(f"unknown TrainState field {k!r}")
        fresh = TrainState(**d)
        for k in known:
            setattr(self, k, getattr(fresh, k))


@dataclass
class RunState:
    """The saveable state of one run (see the module docstring)."""

    model: torch.nn.Module        # as trained: possibly wrapped by the strategy
    optimizer: torch.optim.Optimizer
    scheduler: Any                # torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    counters: TrainState
    unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m

    def state_dict(self, *, sharded: bool = False) -> dict:
        sd = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
              "rng": rng_state(), "state": self.counters.state_dict()}
        if not sharded:
            sd["model"] = self.unwrap(self.model).state_dict()
            sd["optimizer"] = self.optimizer.state_dict()
        return sd

    def load_state_dict(self, sd: dict, *, sharded: bool = False) -> None:
        if not sharded:
            self.unwrap(self.model).load_state_dict(sd["model"])
            self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        self.counters.load_state_dict(sd["state"])
        set_rng_state(sd["rng"])


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors / plain types."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
