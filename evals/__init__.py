"""sftctl.evals: post-training lm-eval benchmarks (base vs SFT) and the run report.

Public API (imported lazily, so ``import sftctl.evals`` pulls in neither lm-eval nor matplotlib):

- :func:`run_post_train` (after ``sftctl train``), :func:`evaluate_models` (``sftctl eval``)
- :func:`write_report` / :func:`build_report` (``sftctl report RUN_DIR``)
- :func:`alpaca_benchmarks` (the alpaca plugin's held-out tasks, as ``BenchmarkSpec`` s)
- :class:`BenchmarkSpec`, :class:`ReportSection` (what plugins return from the benchmark and
  report hooks)
"""

from __future__ import annotations

from .spec import BenchmarkSpec, ReportSection

__all__ = ["BenchmarkSpec", "ReportSection", "run_post_train", "evaluate_models", "EvalOptions",
           "write_report", "build_report", "alpaca_benchmarks", "REPORT_SCHEMA_VERSION"]

_LAZY = {
    "run_post_train": "runner", "evaluate_models": "runner", "EvalOptions": "runner",
    "write_report": "report", "build_report": "report", "REPORT_SCHEMA_VERSION": "report",
    "alpaca_benchmarks": "alpaca_tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
