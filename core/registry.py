"""What plugins register: dataset formats, optimizers, LR schedulers and benchmarks.

Design choices
- Each kind is a small frozen dataclass holding a name, a callable and documentation. Plugins
  build them and hand them to the ``register`` callback of the matching hook
  (``sftctl_register_dataset_formats(register)`` ...); the plugin manager stamps the registering
  plugin's name into ``plugin`` and refuses a second registration of the same name, naming both
  plugins.
- A dataset format turns one record (a dict) into ``Segment``s: pieces of text with a flag saying
  whether the loss is computed on them. That single shape covers single-turn formats (prompt,
  response) and multi-turn chats (several trainable turns) without the trainer knowing either.
  A bad record raises ``RecordError(field, message)``; the data pipeline adds the file, record
  index and line.
- A benchmark is ``sftctl.evals.spec.BenchmarkSpec`` (re-exported here): an lm-eval task name
  plus the folder of its task YAML, run on the base model and the SFT checkpoint after training.
  Report sections are ``sftctl.evals.spec.ReportSection``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text. ``trainable``: the loss is computed on its tokens."""

    text: str
    trainable: bool


class RecordError(ValueError):
    """Raised by a format's ``to_segments`` for an invalid record; names the offending field."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.message}" if self.field else self.message


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset format: how records become prompt/response segments.

    - ``to_segments(record) -> Sequence[Segment]``; raise ``RecordError`` for a bad record.
      With ``uses_options=True`` it is called as ``to_segments(record, options)`` where
      ``options`` is the run's plugin-option dict (``config.options``): formats read their
      settings from there, never from module globals, so worker processes and the datasets
      cache see them (a changed option re-tokenizes).
    - ``fields``: field name -> short description (shown by ``sftctl plugins``; the required ones
      are checked against the loaded columns before any record is processed).
    - ``required``: the subset of ``fields`` that must be present as columns.
    - ``demo_data(config) -> {"train": records, "validation": records, ...}``: the data used when
      the format is selected and no ``--data`` is given (optional).
    - ``demo_config``: path of a YAML config layer (tuned defaults) applied when training the
      embedded demo model (no ``--model``) with this format (optional).
    """

    name: str
    to_segments: Callable[[Mapping[str, Any]], Sequence[Segment]]
    fields: Mapping[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    description: str = ""
    demo_data: Callable[[Any], Mapping[str, Sequence[Mapping[str, Any]]]] | None = None
    demo_config: str | None = None
    uses_options: bool = False
    plugin: str | None = None

    def segments(self, record: Mapping[str, Any], options: Mapping[str, Any] | None = None
                 ) -> Sequence[Segment]:
        if self.uses_options:
            return self.to_segments(record, dict(options or {}))
        return self.to_segments(record)


@dataclass(frozen=True)
class OptimizerSpec:
    """``build(params, optim_config, device) -> torch.optim.Optimizer``.

    ``params`` are parameter groups (list of dicts with "params" and "weight_decay"), so weight
    decay is applied only where the trainer decides (not to biases and norms).
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    plugin: str | None = None


@dataclass(frozen=True)
class SchedulerSpec:
    """``build(optimizer, total_steps, warmup_steps, optim_config) -> LRScheduler``.

    The scheduler is stepped once per optimizer step and must have a ``state_dict`` (a
    ``LambdaLR`` with a picklable-free lambda is fine: its state is the step count).
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    plugin: str | None = None


def __getattr__(name):
    # Benchmarks are described by the evaluation package's spec (sftctl.evals.spec), imported
    # lazily so that training never imports the evaluation stack.
    if name in ("BenchmarkSpec", "ReportSection"):
        from .evals import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
