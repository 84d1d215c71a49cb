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
import math
from pathlib import Path

from sftctl import hookimpl

KEY = "metrics_jsonl.file"


def _nonfinite(x) -> str | None:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return None


def strict(obj):
    """``obj`` with each non-finite float replaced by None; in a dict the key also gets a
    ``<key>_nonfinite`` flag (in a list, the list's key gets the first element's kind)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            kind = _nonfinite(v)
            if kind is None and isinstance(v, (list, tuple)):
                kind = next((c for c in map(_nonfinite, v) if c), None)
            out[k] = strict(v)
            if kind is not None:
                out[f"{k}_nonfinite"] = kind
        return out
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return None if _nonfinite(obj) else obj


def dumps(metrics: dict) -> str:
    # allow_nan=False: a value strict() missed fails here, never as an invalid line on disk
    return json.dumps(strict(metrics), allow_nan=False)


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
