"""The evaluation step's own task description, and how plugin benchmarks become one.

Plugins register ``sftctl.registry.BenchmarkSpec`` objects through the hook
``sftctl_register_benchmarks``: a name plus either ``prepare(work_dir) -> task config``, a ready
``task`` config, or nothing (a standard lm-eval task). :func:`prepare_benchmarks` turns them into
:class:`EvalTask` s: it calls ``prepare``, writes each config as a task YAML into the run's
``eval/tasks/`` folder, and records where.

Design choices
- ``EvalTask`` is plain JSON data (no callables), so the worker subprocess receives it as JSON,
  ``eval/manifest.json`` records it, and ``sftctl eval RUN_DIR`` can re-run the prepared YAMLs
  later from the run directory alone, without the plugin that registered them.
- ``include_path=None`` means a standard lm-eval task from its built-in index; only then does the
  runner build the (slow, ~14k entries) default index.
- A prepared config must name itself (``task``) as the spec does and use absolute data paths;
  violations are errors naming the benchmark and the plugin.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = ["EvalTask", "tasks_from_json", "prepare_benchmarks"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass
class EvalTask:
    """One lm-eval task to run on the base model and on the SFT checkpoint.

    name:           the task name lm-eval resolves (``task:`` in the YAML, or a built-in task).
    include_path:   folder of task YAMLs (absolute); None for a built-in lm-eval task.
    plugin:         the plugin that registered it (shown in the report).
    description:    one line for the report.
    primary_metric: the metric the report lists first (e.g. ``exact_match``).
    limit:          evaluate at most this many documents (None: all).
    num_fewshot:    None keeps the task's own setting (0 when it has none).
    stats:          counts the task builder wants shown (records written, left out, ...).
    """

    name: str
    include_path: str | None = None
    plugin: str | None = None
    description: str = ""
    primary_metric: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"invalid lm-eval task name {self.name!r}")
        if self.include_path is not None:
            p = Path(self.include_path)
            if not p.is_absolute():
                raise ValueError(f"task {self.name!r}: include_path must be absolute, got "
                                 f"{self.include_path!r}")
            self.include_path = str(p)
        for k in ("limit", "num_fewshot"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"task {self.name!r}: {k} must be a non-negative int, got {v!r}")

    @property
    def builtin(self) -> bool:
        """True for a standard lm-eval task (needs lm-eval's default task index)."""
        return self.include_path is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "task") -> EvalTask:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "name" not in d:
            raise ValueError(f"{where}: missing field 'name'")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def tasks_from_json(items: Any, where: str) -> list[EvalTask]:
    """Parse a list of task dicts (from a manifest); errors name the entry."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a list of tasks, got {type(items).__name__}")
    return [d if isinstance(d, EvalTask) else EvalTask.from_dict(d, where=f"{where}[{i}]")
            for i, d in enumerate(items)]


def _check_paths(cfg: Mapping[str, Any], who: str) -> None:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(files, Mapping):
        files = [f for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    for f in files:
        if not Path(str(f)).is_absolute():
            raise ValueError(f"{who}: data file {f!r} must be an absolute path (lm-eval resolves "
                             "relative paths against its working directory)")
        if not Path(str(f)).exists():
            raise ValueError(f"{who}: data file {f} does not exist")


def prepare_benchmarks(benchmarks: Iterable[Any], work_dir: str | Path, *,
                       limit: int | None = None) -> list[EvalTask]:
    """Turn registered ``BenchmarkSpec`` s (``sftctl.registry``) into :class:`EvalTask` s.

    ``prepare(work_dir)`` (or the ready ``task`` dict) gives an lm-eval task config, which is
    written to ``work_dir/<name>.yaml``. A spec with neither is a standard lm-eval task name.
    ``limit`` is stored on every task (``--eval-limit``).
    """
    work_dir = Path(work_dir).resolve()
    out: list[EvalTask] = []
    seen: dict[str, str | None] = {}
    for spec in benchmarks:
        if isinstance(spec, EvalTask):
            out.append(spec)
            continue
        name = getattr(spec, "name", None)
        plugin = getattr(spec, "plugin", None)
        who = f"benchmark {name!r}" + (f" (plugin {plugin!r})" if plugin else "")
        if name in seen:
            raise ValueError(f"{who}: registered twice (also by plugin {seen[name]!r})")
        seen[name] = plugin
        prepare, task_cfg = getattr(spec, "prepare", None), getattr(spec, "task", None)
        stats: dict[str, Any] = {}
        if prepare is not None or task_cfg is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
            try:
                cfg = dict(prepare(work_dir) if prepare is not None else task_cfg)
            except Exception as e:
                raise ValueError(f"{who}: prepare({work_dir}) failed: {type(e).__name__}: {e}") from e
            stats = dict(cfg.pop("sftctl_stats", None) or {})
            if cfg.get("task", name) != name:
                raise ValueError(f"{who}: its task config is named {cfg.get('task')!r}; the config's "
                                 "'task' must equal the benchmark name")
            cfg["task"] = name
            _check_paths(cfg, who)
            (work_dir / f"{name}.yaml").write_text(
                f"# lm-eval task written by sftctl for {who}; data paths are absolute.\n"
                + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
            include = str(work_dir)
        else:
            include = None
        out.append(EvalTask(name=name, include_path=include, plugin=plugin,
                            description=getattr(spec, "description", "") or "",
                            primary_metric=getattr(spec, "primary_metric", None),
                            limit=limit, stats=stats))
    return out
