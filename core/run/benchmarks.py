"""What benchmark and report plugins hand over: ``BenchmarkSpec`` and ``ReportSection``.

Design choices
- These are plain data (no callables), defined here in the core so that the core can collect
  and record them (``summary.json``) without importing the evaluation package; ``sftctl.evals``
  consumes them.
- A benchmark is one lm-eval *task* (a name lm-eval's ``TaskManager`` resolves) plus the folder of
  its task YAML. ``include_path=None`` means a standard lm-eval task from its built-in index.
- Specs survive JSON: the evaluation worker receives them as JSON, ``eval/manifest.json`` records
  them, and ``sftctl eval RUN_DIR`` can re-run the task YAMLs later from the run directory alone.
- Report sections are title + markdown (+ optional ready HTML), so one section renders into both
  report.md and report.html.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["BenchmarkSpec", "ReportSection", "specs_from_json"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass
class BenchmarkSpec:
    """One lm-eval task to run on the base model and on the SFT checkpoint.

    name:           the task name lm-eval resolves (``task:`` in the YAML, or a built-in task).
    include_path:   folder of task YAMLs (absolute); None for a built-in lm-eval task.
    plugin:         the plugin that registered it (shown in the report).
    description:    one line for the report.
    primary_metric: the metric the report lists first (e.g. ``exact_match``).
    limit:          evaluate at most this many documents (None: all).
    num_fewshot:    None keeps the task's own setting (0 when it has none).
    stats:          counts the task builder wants shown (records written, left out, ...).
    apply_chat_template: prompts are rendered with the evaluated model's chat template
                    (lm-eval's ``apply_chat_template``).
    chat_template:  Jinja template used for a model whose tokenizer has none (a base model
                    trained with ``--chat-template``), so base and SFT see the same format.
    """

    name: str
    include_path: str | None = None
    plugin: str | None = None
    description: str = ""
    primary_metric: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    apply_chat_template: bool = False
    chat_template: str | None = None

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
    def from_dict(cls, d: Any, where: str = "task") -> BenchmarkSpec:
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


def specs_from_json(items: Any, where: str) -> list[BenchmarkSpec]:
    """Parse a list of task dicts (from a manifest); errors name the entry."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a list of tasks, got {type(items).__name__}")
    return [d if isinstance(d, BenchmarkSpec) else BenchmarkSpec.from_dict(d, where=f"{where}[{i}]")
            for i, d in enumerate(items)]


@dataclass
class ReportSection:
    """A section a plugin adds to the report (hook ``sftctl_report_sections``; a plain dict with
    the same keys works too). ``html``, when given, is used verbatim in report.html instead of the
    converted markdown."""

    title: str
    markdown: str = ""
    html: str | None = None
    plugin: str | None = None
