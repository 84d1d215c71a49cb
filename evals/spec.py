"""Checks of what plugins hand to the evaluation step (the specs themselves live in the core,
``sftctl.run.benchmarks``, and are re-exported here).

Design choices
- A benchmark is one lm-eval *task* (a name lm-eval's ``TaskManager`` resolves) plus the folder of
  its task YAML. ``include_path=None`` means a standard lm-eval task from its built-in index; only
  then does the runner build the (slow, ~14k entries) default index.
- Specs are plain JSON data (no callables): the worker subprocess receives them as JSON,
  ``eval/manifest.json`` records them, and ``sftctl eval RUN_DIR`` can re-run the task YAMLs
  later from the run directory alone, without the plugin that registered them.
- A plugin writes its task YAML (with absolute data paths) when it registers the benchmark; the
  runner checks that the YAML exists and that its data files are absolute and present before any
  model is loaded, and names the benchmark and plugin when not.
- Report sections are title + markdown (+ optional ready HTML), so one section renders into both
  report.md and report.html; markdown is converted to escaped HTML by the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from sftctl.run.benchmarks import BenchmarkSpec, ReportSection, specs_from_json

__all__ = ["BenchmarkSpec", "ReportSection", "specs_from_json", "check_task_files"]


def _data_files(cfg: Mapping[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        return [str(files)]
    if isinstance(files, Mapping):
        return [str(f) for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    return [str(f) for f in files]


def check_task_files(spec: BenchmarkSpec) -> None:
    """A local task must have a YAML named after it in ``include_path`` whose data files are
    absolute and exist (lm-eval would resolve relative ones against its working directory)."""
    if spec.include_path is None:
        return
    who = f"benchmark {spec.name!r}" + (f" (plugin {spec.plugin!r})" if spec.plugin else "")
    folder = Path(spec.include_path)
    if not folder.is_dir():
        raise ValueError(f"{who}: task folder {folder} does not exist")
    found = None
    for path in sorted(folder.glob("*.y*ml")):
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if isinstance(cfg, dict) and cfg.get("task") == spec.name:
            found = (path, cfg)
            break
    if found is None:
        raise ValueError(f"{who}: no task YAML with 'task: {spec.name}' in {folder}")
    path, cfg = found
    for f in _data_files(cfg):
        if not Path(f).is_absolute():
            raise ValueError(f"{path}: data file {f!r} must be an absolute path")
        if not Path(f).exists():
            raise ValueError(f"{path}: data file {f} does not exist")


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML loader that tolerates lm-eval's ``!function`` tags (kept as plain strings)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


