"""What lifecycle hooks see of a run: ``RunContext``, a narrow, read-only view.

Design choices
- Plugins get this, never the ``Trainer``: the trainer's internals stay free to change, and what
  a plugin can rely on is exactly what is listed here (documented in docs/plugins.md).
- Read-only: properties only, and the history is handed out as a tuple of copies. The two ways
  a plugin acts on a run are explicit: ``request_stop(reason)`` and ``extras``, a dict for the
  plugin's own per-run state (kept there, not in module globals, so several runs in one process
  do not mix; not part of resumable checkpoints).
- ``model`` is the unwrapped model (not the DDP/FSDP wrapper) for plugins that read weights or
  the config; changing it from a hook is unsupported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunContext:
    """The run as plugins see it (see the module docstring)."""

    def __init__(self, trainer):
        self._trainer = trainer

    # -- what the run is
    @property
    def config(self):
        """The validated run config (``config.option(NAME)`` reads a plugin option)."""
        return self._trainer.config

    @property
    def output_dir(self) -> Path:
        return self._trainer.out_dir

    @property
    def is_main(self) -> bool:
        """Rank 0 (the only process under a plain run): write files only there."""
        return self._trainer.strategy.is_main

    @property
    def rank(self) -> int:
        return self._trainer.strategy.rank

    @property
    def world_size(self) -> int:
        return self._trainer.strategy.world_size

    @property
    def device(self):
        return getattr(self._trainer, "device", None)

    @property
    def model(self):
        """The model being trained, unwrapped from DDP/FSDP (``None`` before setup)."""
        t = self._trainer
        return t.unwrapped_model if getattr(t, "model", None) is not None else None

    @property
    def tokenizer(self):
        return getattr(self._trainer, "tokenizer", None)

    # -- where it is
    @property
    def step(self) -> int:
        """Optimizer steps done (non-zero at ``train_start`` after a resume)."""
        return self._trainer.state.step

    @property
    def epoch(self) -> int:
        return self._trainer.state.epoch

    @property
    def total_steps(self) -> int | None:
        return getattr(self._trainer, "total_steps", None)

    @property
    def history(self) -> tuple[dict, ...]:
        """Every metrics line so far (train and validation), oldest first; copies."""
        return tuple(dict(h) for h in self._trainer.state.history)

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint this run resumed from, if any."""
        return self._trainer.resumed_from

    # -- what a plugin may do
    @property
    def extras(self) -> dict[str, Any]:
        """Per-run storage for plugins (use a key of your plugin's name)."""
        return self._trainer.extras

    def request_stop(self, reason: str) -> None:
        """End training after the current step; validation and the final save still happen."""
        self._trainer.stop_reason = reason

    def __repr__(self) -> str:
        return (f"RunContext(output_dir={str(self.output_dir)!r}, step={self.step}, "
                f"rank={self.rank}/{self.world_size})")
