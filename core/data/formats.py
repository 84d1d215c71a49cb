"""What a dataset-format plugin registers: ``DatasetFormat``, the ``Segment``s it produces, and
``RecordError`` for bad records; plus the checks applied to what a format returns.

Design choices
- A dataset format turns one record (a dict) into ``Segment``s: pieces of text with a flag saying
  whether the loss is computed on them. That single shape covers single-turn formats (prompt,
  response) and multi-turn chats (several trainable turns) without the trainer knowing either.
- A bad record raises ``RecordError(field, message)``; the data pipeline adds the file, record
  index and line. Any other exception from ``to_segments`` is a bug of the plugin, reported as
  such (naming the plugin), never as invalid data.
- Benchmarks of the user's own data need (prompt, reference) pairs: ``DatasetFormat.pair``. A
  segment format gets them for free (the text before its last trainable segment, and that
  segment); a format may give ``to_pair`` instead (token-level formats must, e.g. the chat
  plugin: the conversation minus its last answer as messages, and the answer). A prompt is a
  string (used verbatim) or a list of chat messages (rendered by the evaluated model's chat
  template).
- A format may bring its own demo: records (``demo_data``), tuned defaults (``demo_config``) and
  the embedded base model those defaults were tuned for (``demo_base``), so that
  ``sftctl train --plugin NAME`` runs offline with nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import PluginHookError


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
    - ``demo_base(out_dir, seed)``: writes the embedded base model (a Hugging Face model
      directory with its tokenizer) used when no ``--model`` is given (optional; without it a
      run of this format needs ``--model``).

    Token-level formats (chat templates, which decide their own special tokens) give
    ``to_tokens(record, tokenizer, options) -> (input_ids, loss_mask)`` instead of
    ``to_segments``: the ids are final (no BOS/EOS is added) and the mask marks the trained
    tokens. They may give ``validate(record, options)`` (raises ``RecordError``) for the checks
    that need no tokenizer, which the careful JSON reader runs on every record.

    ``to_pair(record, options) -> (prompt, reference)`` (optional): what the benchmark of the
    user's held-out data generates from and compares with (see :meth:`pair`; segment formats
    need not give it).
    """

    name: str
    to_segments: Callable[[Mapping[str, Any]], Sequence[Segment]] | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    description: str = ""
    demo_data: Callable[[Any], Mapping[str, Sequence[Mapping[str, Any]]]] | None = None
    demo_config: str | None = None
    demo_base: Callable[[Any, int], None] | None = None
    uses_options: bool = False
    to_tokens: Callable[[Mapping[str, Any], Any, Mapping[str, Any]],
                        tuple[list[int], list[int]]] | None = None
    validate: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = None
    plugin: str | None = None
    to_pair: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[Any, str]] | None = None

    def __post_init__(self):
        if (self.to_segments is None) == (self.to_tokens is None):
            raise ValueError(f"dataset format {self.name!r}: give exactly one of to_segments "
                             "and to_tokens")

    def segments(self, record: Mapping[str, Any], options: Mapping[str, Any] | None = None
                 ) -> Sequence[Segment]:
        if self.uses_options:
            return self.to_segments(record, dict(options or {}))
        return self.to_segments(record)

    @property
    def has_pairs(self) -> bool:
        """True when :meth:`pair` can answer (a segment format, or ``to_pair`` given)."""
        return self.to_pair is not None or self.to_segments is not None

    def pair(self, record: Mapping[str, Any], options: Mapping[str, Any] | None = None
             ) -> tuple[str | list[dict], str]:
        """``(prompt, reference)`` of one record for the post-training benchmark of the user's
        data: ``to_pair(record, options)`` when the format gives it, else the text of the
        segments before the last trainable one and the text of that one. ``prompt`` is a string
        or a list of chat messages (``{"role", "content"}``). Raises ``RecordError``."""
        if self.to_pair is not None:
            out = self.to_pair(record, dict(options or {}))
            if (not isinstance(out, (tuple, list)) or len(out) != 2 or
                    not isinstance(out[1], str) or not isinstance(out[0], (str, list))):
                raise RecordError(None, f"format {self.name!r}: to_pair returned {out!r:.80}, "
                                        "expected (prompt: str or list of messages, "
                                        "reference: str)")
            return out[0], out[1]
        if self.to_segments is None:
            raise RecordError(None, f"format {self.name!r} is token-level and gives no to_pair: "
                                    "it cannot provide prompt/reference pairs")
        segs = check_segments(self.segments(record, options), self)
        last = max((i for i, s in enumerate(segs) if s.trainable), default=None)
        if last is None:
            raise RecordError(None, f"format {self.name!r} returned no trainable segment")
        return "".join(s.text for s in segs[:last]), segs[last].text

    def check(self, record: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> None:
        """Validate one record without tokenizing it (raises ``RecordError``)."""
        if self.to_segments is not None:
            check_segments(self.segments(record, options), self)
        elif self.validate is not None:
            self.validate(record, dict(options or {}))


def format_bug(fmt: DatasetFormat, where: str, error: BaseException) -> PluginHookError:
    """The error for ``to_segments`` raising anything but ``RecordError`` at record ``where``."""
    return PluginHookError(fmt.plugin, f"dataset format {fmt.name!r} (to_segments)", error,
                           where=f" at {where}",
                           hint=" (a bug in the plugin, not invalid data: --skip-invalid does "
                                "not skip it)")


def surrogate(text: str) -> str | None:
    """Where a string is not valid Unicode (a lone surrogate, e.g. from the JSON escape
    "\\ud800"): Arrow cannot store it and the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


def invalid_unicode(rec: dict) -> str | None:
    for k, v in rec.items():
        if isinstance(v, str) and (why := surrogate(v)) is not None:
            return f"field {k!r}: not valid Unicode: {why}"
    return None


def check_segments(segs, fmt: DatasetFormat) -> list[Segment]:
    if not isinstance(segs, (list, tuple)) or not segs:
        raise RecordError(None, f"format {fmt.name!r} returned no segments")
    for i, s in enumerate(segs):
        if not isinstance(s, Segment) or not isinstance(s.text, str):
            raise RecordError(None, f"format {fmt.name!r} returned {s!r}, expected Segment(text: "
                                    "str, trainable: bool)")
        if (why := surrogate(s.text)) is not None:
            raise RecordError(None, f"text of segment {i} is not valid Unicode: {why}")
    return list(segs)
