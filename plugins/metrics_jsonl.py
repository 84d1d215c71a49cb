"""Built-in plugin ``metrics_jsonl``: one JSON object per line in ``OUTPUT_DIR/metrics.jsonl``.

Design choices
- Written by rank 0 only, flushed after every line so a crashed run keeps its curve.
- At train start the file is rewritten from ``run.history`` (empty for a fresh run,
  the restored history after a resume), so the file always matches the state the run continues
  from, with no duplicated or orphaned lines.
- The open file lives in ``run.extras`` (not in module globals), so several runs in one
  process (tests) do not share it.
- Every line is strict JSON: a non-finite float (a skipped step's loss or grad norm) is written
  as ``null`` with a sibling ``<key>_nonfinite`` flag (``"nan"``, ``"inf"`` or ``"-inf"``), since
  ``NaN``/``Infinity`` are not JSON and break strict parsers. The history itself keeps the raw
  floats (the checkpoint stores them), so a resumed run rewrites the same lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftctl import hookimpl
from sftctl.training.atomic import strict_json

KEY = "metrics_jsonl.file"


def dumps(metrics: dict) -> str:
    # allow_nan=False: a value strict_json missed fails here, never as an invalid line on disk
    return json.dumps(strict_json(metrics, flag_lists=True), allow_nan=False)


def _write(run, metrics: dict) -> None:
    f = run.extras.get(KEY)
    if f is not None:
        f.write(dumps(metrics) + "\n")
        f.flush()


@hookimpl
def sftctl_train_start(run):
    if not run.is_main:
        return
    path = Path(run.output_dir) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w", encoding="utf-8")
    run.extras[KEY] = f
    for line in run.history:
        f.write(dumps(line) + "\n")
    f.flush()


@hookimpl
def sftctl_step_end(run, metrics):
    _write(run, metrics)


@hookimpl
def sftctl_evaluate(run, metrics):
    _write(run, metrics)


@hookimpl
def sftctl_after_train(run):
    f = run.extras.pop(KEY, None)
    if f is not None:
        f.close()
