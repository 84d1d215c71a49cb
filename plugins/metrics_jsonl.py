"""Built-in plugin ``metrics_jsonl``: one JSON object per line in ``OUTPUT_DIR/metrics.jsonl``.

Design choices
- Written by rank 0 only, flushed after every line so a crashed run keeps its curve.
- At train start the file is rewritten from ``trainer.state.history`` (empty for a fresh run,
  the restored history after a resume), so the file always matches the state the run continues
  from, with no duplicated or orphaned lines.
- The open file lives in ``trainer.extras`` (not in module globals), so several trainers in one
  process (tests) do not share it.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftctl import hookimpl

KEY = "metrics_jsonl.file"


def _write(trainer, metrics: dict) -> None:
    f = trainer.extras.get(KEY)
    if f is not None:
        f.write(json.dumps(metrics) + "\n")
        f.flush()


@hookimpl
def sftctl_train_start(trainer):
    if not trainer.is_main:
        return
    path = Path(trainer.out_dir) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w", encoding="utf-8")
    trainer.extras[KEY] = f
    for line in trainer.state.history:
        f.write(json.dumps(line) + "\n")
    f.flush()


@hookimpl
def sftctl_step_end(trainer, metrics):
    _write(trainer, metrics)


@hookimpl
def sftctl_evaluate(trainer, metrics):
    _write(trainer, metrics)


@hookimpl
def sftctl_after_train(trainer):
    f = trainer.extras.pop(KEY, None)
    if f is not None:
        f.close()
