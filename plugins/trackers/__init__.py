"""Experiment trackers as built-in plugins: ``tensorboard``, ``wandb``, ``mlflow`` (one module
each), selected with ``--report-to tensorboard,wandb`` (``train.report_to``).

Design choices
- One plugin per tracker, all written against the small ``Tracker`` interface below and driven
  by the same functions (``start``, ``log_train``, ``log_val``, ``after_train``,
  ``post_train``), so every tracker logs the same names: ``train/loss``, ``train/lr``,
  ``train/grad_norm``, ``train/tokens_per_s`` (and any other number of the metrics line, as
  ``train/<key>``), ``val/loss``, ``val/ppl`` (``val/<key>`` for keys plugins add), the step as
  the x axis; the run config as hyperparameters at the start; the final summary at the end; the
  benchmark table base vs SFT after the post-training evaluation.
- Only rank 0 writes: ``start`` does nothing where ``run.is_main`` is false, and the other hooks
  find no open tracker there.
- The benchmark table arrives after training: the ``evals`` plugin writes ``report.json`` in
  its ``sftctl_post_train``. A tracker's ``sftctl_post_train`` is ``trylast`` so that it runs
  after every plain implementation, evals' included, whatever the registration order (pluggy
  calls tryfirst, then plain, then trylast implementations, each group last-registered first);
  ``tests/test_trackers.py`` checks that order. Only a ``report.json`` written after this run's
  final model counts (older is ignored with a warning): a tracker never shows results of
  another run.
- A tracker therefore stays open from ``sftctl_train_start`` to ``sftctl_post_train`` (W&B cannot
  reopen an offline run without a second run directory). ``sftctl_post_train`` receives no
  ``run``, so open trackers are kept in a module dict keyed by the resolved run directory (one
  entry per run, several runs in one process do not mix). Where post-training does not follow
  (``--no-eval``, ranks other than 0) ``sftctl_after_train`` closes the tracker; where training
  ended otherwise (an error, a preemption) an ``atexit`` handler closes what is still open, so
  event files and offline runs are always finished.
- Benchmarks during training (``--benchmark-every N``): each benchmarked step's scores go to
  the tracker at that step as ``benchmark_steps/<task>/<metric>`` (``<metric>_<filter>`` for a
  filtered lm-eval metric), through the same ``log_scalars`` as the step metrics; the final
  model's point of the series (same capped documents) at the last step. Like the table, they
  come from the ``evals`` plugin's file, here ``eval/steps.json``, read in a ``trylast``
  ``sftctl_checkpoint_saved`` (after evals benchmarked that checkpoint in its own
  implementation of the hook) and, for the final point, in ``sftctl_post_train``. These are
  the scores on the ``--benchmark-limit`` subset; the full benchmark table keeps its own names
  ``benchmark/<task>/<metric>/<base|sft|delta>``. The series is not named
  ``benchmark/<task>/<metric>``: MLflow's file store keeps a metric as a file at its name's
  path, so a name that is the path prefix of another (the table's) fails there.
- Resume: each tracker keeps its run id in ``OUTPUT_DIR/trackers/<name>.json`` and a resumed run
  continues the same tracker run (TensorBoard purges events past the resumed step).
- Errors: a tracker that fails to start raises (exit 2 before training, named by the plugin
  manager); a failure while logging is a training-time plugin error (exit 1): nothing is
  dropped silently.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
from pathlib import Path
from typing import Any

from sftctl.training.trackers import selected_trackers

log = logging.getLogger("sftctl")

_OPEN: dict[tuple[str, str], "Tracker"] = {}  # (resolved run dir, tracker name) -> tracker

SKIP_KEYS = {"kind", "step", "time"}


class Tracker:
    """What one tracker implements (see the module docstring)."""

    name = "tracker"

    def __init__(self, run_dir: Path, config, state: dict, resume_step: int | None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.state = state  # persisted in OUTPUT_DIR/trackers/<name>.json (run ids)
        self.resume_step = resume_step
        self.last_step: int | None = None  # the benchmark table is logged at this step

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_summary(self, summary: dict[str, float]) -> None:
        raise NotImplementedError

    def log_benchmarks(self, step: int, rows: list[dict], markdown: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def train_scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k in SKIP_KEYS or k.endswith("_nonfinite") or k == "tokens":
            continue
        x = _number(v)
        if x is not None:
            out[f"train/{k}"] = x
    return out


def val_scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k in SKIP_KEYS or k.endswith("_nonfinite"):
            continue
        x = _number(v)
        if x is not None:
            out[f"val/{k.removeprefix('val_')}"] = x
    return out


def flat_config(config) -> dict[str, Any]:
    """The run config as flat dotted keys (hyperparameters for the trackers)."""
    out: dict[str, Any] = {}

    def walk(prefix, obj):
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = obj if isinstance(obj, (int, float, str, bool)) or obj is None \
                else json.dumps(obj, default=str)
    walk("", config.to_dict())
    return out


def summary_scalars(summary: dict) -> dict[str, float]:
    keys = ("steps", "epochs", "tokens", "trainable_tokens", "train_time_s", "tokens_per_s",
            "final_loss", "initial_val_loss", "val_loss", "val_ppl", "peak_memory_bytes")
    out = {}
    for k in keys:
        x = _number(summary.get(k))
        if x is not None and math.isfinite(x):
            out[f"summary/{k}"] = x
    return out


def _key(run_dir, name: str) -> tuple[str, str]:
    return (str(Path(run_dir).resolve()), name)


def _state_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "trackers" / f"{name}.json"


def _load_state(run_dir: Path, name: str, resumed: bool) -> dict:
    path = _state_path(run_dir, name)
    if resumed and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("%s tracker: cannot read %s (%s): starting a new tracker run", name,
                        path, e)
    return {}


def save_state(tracker: Tracker) -> None:
    from sftctl.training.atomic import write_json

    path = _state_path(tracker.run_dir, tracker.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, tracker.state)


def start(run, cls: type[Tracker]) -> None:
    """``sftctl_train_start``: open the tracker when it is selected, on rank 0."""
    if not getattr(run, "is_main", False) or cls.name not in selected_trackers(run.config):
        return
    key = _key(run.output_dir, cls.name)
    old = _OPEN.pop(key, None)
    if old is not None:  # a previous run in this process into the same directory
        old.close()
    resumed = run.resumed_from is not None
    tracker = cls(Path(run.output_dir), run.config, _load_state(run.output_dir, cls.name,
                                                               resumed),
                  run.step if resumed else None)
    save_state(tracker)
    _OPEN[key] = tracker
    log.info("%s tracker: logging to %s", cls.name, getattr(tracker, "where", run.output_dir))


def _open(run_dir, name: str) -> Tracker | None:
    if not _OPEN:  # the common case (no --report-to): nothing to resolve
        return None
    return _OPEN.get(_key(run_dir, name))


def log_train(run, name: str, metrics: dict) -> None:
    t = _open(run.output_dir, name) if _OPEN else None
    if t is not None:
        t.last_step = int(metrics.get("step", run.step))
        t.log_scalars(t.last_step, train_scalars(metrics))


def log_val(run, name: str, metrics: dict) -> None:
    t = _open(run.output_dir, name) if _OPEN else None
    if t is not None:
        t.last_step = int(metrics.get("step", run.step))
        t.log_scalars(t.last_step, val_scalars(metrics))


def after_train(run, name: str, summary: dict) -> None:
    """``sftctl_after_train``: the final summary; close unless post-training follows here."""
    t = _open(run.output_dir, name) if _OPEN else None
    if t is None:
        return
    if summary.get("steps") is not None:
        t.last_step = int(summary["steps"])
    t.log_summary(summary_scalars(summary))
    if not (run.is_main and run.config.eval.enabled):
        close(run.output_dir, name)


def close(run_dir, name: str) -> None:
    t = _OPEN.pop(_key(run_dir, name), None)
    if t is not None:
        t.close()


def read_benchmarks(run_dir: Path) -> tuple[list[dict], str] | None:
    """The benchmark rows of this run's ``report.json`` and a Markdown table of them; None when
    there is none (or the file predates the final model: another run's)."""
    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    model_summary = run_dir / "model" / "sftctl_summary.json"
    if model_summary.is_file() and path.stat().st_mtime < model_summary.stat().st_mtime:
        log.warning("%s is older than the final model: not this run's benchmarks, not logged",
                    path)
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): no benchmark table for the trackers", path, e)
        return None
    bench = report.get("benchmarks") or {}
    rows = bench.get("table") or []
    if not rows:
        return None
    from sftctl.evals.report import benchmark_markdown

    return rows, benchmark_markdown(rows, bench.get("labels") or [])


def benchmark_scalars(rows: list[dict]) -> dict[str, float]:
    """``benchmark/<task>/<metric>/<label>`` for every number of the table."""
    out = {}
    for r in rows:
        metric = r.get("metric", "-") + ("" if r.get("filter", "none") == "none"
                                         else f"_{r['filter']}")
        for lb in ("base", "sft", "delta"):
            x = _number(r.get(lb))
            if x is not None and math.isfinite(x):
                out[f"benchmark/{r.get('task')}/{metric}/{lb}"] = x
    return out


def steps_points(run_dir: Path) -> list[dict]:
    """The points of ``eval/steps.json`` (the ``--benchmark-every`` series the ``evals`` plugin
    writes; see ``sftctl.evals.steering``); [] when there is none."""
    path = Path(run_dir) / "eval" / "steps.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): the benchmark scores of the steps are not logged to "
                    "the trackers", path, e)
        return []
    points = data.get("points") if isinstance(data, dict) else None
    return [p for p in points or [] if isinstance(p, dict)]


def point_scalars(point: dict) -> dict[str, float]:
    """``benchmark_steps/<task>/<metric>`` (``<metric>_<filter>``) for each finite score of one
    point of the series."""
    out = {}
    for task, scores in (point.get("scores") or {}).items():
        for key, v in (scores or {}).items():
            x = _number(v)
            if x is not None and math.isfinite(x):
                out[f"benchmark_steps/{task}/{str(key).replace(',', '_')}"] = x
    return out


def _log_points(t: Tracker, run_dir, model: str, step: int | None = None) -> int:
    """Log the series points of ``model`` ("checkpoint" or "final"; only at ``step`` when
    given) to ``t`` at their steps; returns how many were logged."""
    n = 0
    for p in steps_points(Path(run_dir)):
        if p.get("model") != model or (step is not None and p.get("step") != step):
            continue
        scalars = point_scalars(p)
        if scalars:
            t.log_scalars(int(p["step"]), scalars)
            n += 1
    return n


def log_benchmark_step(run, name: str, step: int) -> None:
    """``sftctl_checkpoint_saved`` (trylast: after evals benchmarked this checkpoint): the
    scores of a ``--benchmark-every`` step at that step. steps.json is rewritten at the start
    of a run with ``--benchmark-every``, so it never holds another run's points here."""
    every = run.config.eval.benchmark_every
    t = _open(run.output_dir, name) if _OPEN else None
    if t is None or not every or step % every:
        return
    _log_points(t, run.output_dir, "checkpoint", step)


def post_train(run_dir, config, name: str) -> None:
    """``sftctl_post_train`` (trylast: after evals wrote the report): the final model's point of
    the ``--benchmark-every`` series, the benchmark table, then close."""
    t = _open(run_dir, name)
    if t is None:
        return
    try:
        if config.eval.benchmark_every:
            _log_points(t, run_dir, "final")
        found = read_benchmarks(Path(run_dir))
        if found is not None:
            rows, md = found
            step = t.last_step if getattr(t, "last_step", None) is not None else 0
            t.log_benchmarks(step, rows, md)
    finally:
        close(run_dir, name)


@atexit.register
def _close_all() -> None:
    for key in list(_OPEN):
        t = _OPEN.pop(key, None)
        try:
            t.close()
        except Exception as e:  # the process is ending: say so, do not mask its exit status
            log.warning("%s tracker: closing at exit failed: %s: %s", t.name, type(e).__name__,
                        e)
