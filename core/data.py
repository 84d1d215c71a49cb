"""Data pipeline: load sources, validate records, tokenize, and plan batches (padded or packed).

Design choices
- Sources go through ``datasets`` (and its cache): JSON/JSONL/Parquet/CSV files, a directory
  written by ``save_to_disk``, or a hub id. A plugin can load anything else through the
  firstresult hook ``sftctl_load_dataset``. Each source is loaded and validated on its own, so
  every error names the file and the record index (plus the line for JSON Lines).
- When ``datasets`` cannot parse a JSON file (a broken line, a field whose type changes between
  records) the file is re-read with the ``json`` module to name the exact line and field; with
  ``--skip-invalid`` that careful reader is also the fallback loader (bad records are counted).
- CSV columns are read as strings (no "42" -> int guessing, empty cells stay "").
- A dataset format (a plugin) turns a record into segments; tokenization happens in one
  ``datasets.map`` (batched, ``num_proc`` workers) that never raises: it returns an ``error``
  column, so errors from worker processes arrive intact, can be listed several at a time, and
  ``--skip-invalid`` can drop exactly those records and count them.
- Tokens: BOS (when the tokenizer adds one) + each segment tokenized without special tokens +
  EOS; ``loss_mask`` marks response tokens (and the EOS after a trainable segment). Segments are
  tokenized separately so the prompt/response boundary is exact in tokens.
- Truncation to ``max_seq_len`` keeps the beginning, is counted, and an example left with no
  trainable target is dropped and counted. Nothing is dropped silently: ``SplitStats`` carries
  every count into the summary.
- Batch plans are deterministic functions of (seed, epoch): a seeded permutation, then either
  fixed-size padded micro-batches or first-fit packing into rows of ``max_seq_len`` tokens. A
  resumed run rebuilds the same plan and skips the consumed micro-batches; a distributed run
  builds the global plan and takes its rank's rows of every micro-batch (see ``BatchPlan``).
- Packed rows are padding-free: documents are concatenated, ``position_ids`` restart at 0 per
  document and no 2-D attention mask is passed. transformers 5 then derives a block-diagonal
  mask from the position ids (sdpa/eager) or uses varlen kernels (flash attention), so attention
  never crosses documents; ``document_ids`` also go to the label op so that no target crosses a
  document boundary.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import DataError
from .registry import DatasetFormat, RecordError, Segment

log = logging.getLogger("sftctl")

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
                 ".csv": "csv"}
MAX_ERRORS_SHOWN = 5
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One data source: what the user typed, what it resolved to, and how to name a record."""

    spec: str
    kind: str  # "file", "saved", "hub", "plugin", "demo"
    path: Path | None = None
    builder: str | None = None  # datasets builder for files: json, parquet, csv
    _lines: list[int] | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.spec

    def where(self, index: int) -> str:
        """``file.jsonl: record 12 (line 14)``: the line is given for JSON Lines files."""
        line = self.line_of(index)
        return f"{self.label}: record {index}" + (f" (line {line})" if line else "")

    def line_of(self, index: int) -> int | None:
        if self.kind != "file" or self.builder != "json" or self.path is None:
            return None
        if self._lines is None:
            self._lines = _record_lines(self.path)
        if self._lines is None or index >= len(self._lines):
            return None
        return self._lines[index]


def _record_lines(path: Path) -> list[int] | None:
    """Line numbers of the records of a JSON Lines file (None for a JSON document file)."""
    lines = []
    with path.open("rb") as f:
        for no, raw in enumerate(f, 1):
            s = raw.strip()
            if not s:
                continue
            if no == 1 and s[:1] == b"[":
                return None
            lines.append(no)
    return lines


def resolve_source(spec: str) -> Source:
    """Decide what a ``--data`` string is: a local file, a saved dataset directory or a hub id."""
    p = Path(spec).expanduser()
    if p.is_file():
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{p}: unsupported data file type {p.suffix!r}; use "
                            f"{', '.join(sorted(FILE_BUILDERS))} files, a saved datasets "
                            "directory or a hub id")
        return Source(spec, "file", p.resolve(), builder)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or \
                (p / "dataset_dict.json").is_file():
            return Source(spec, "saved", p.resolve())
        files = sorted(x.name for x in p.iterdir())[:8]
        raise DataError(f"{p}: a directory but not one written by datasets' save_to_disk (no "
                        f"dataset_info.json/state.json/dataset_dict.json; contains {files}); "
                        "pass the data files themselves")
    # not on disk: a hub id is "name" or "owner/name"; anything path-like is a missing file
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or \
        Path(spec).suffix.lower() in FILE_BUILDERS or not _HUB_ID.match(spec)
    if looks_like_path:
        raise DataError(f"data file not found: {spec}")
    return Source(spec, "hub")


def load_source(source: Source, split: str, *, cache_dir: str | None = None,
                fmt: DatasetFormat | None = None, skip_invalid: bool = False, counts=None,
                options: dict | None = None):
    """Load one source as a ``datasets.Dataset``. Errors name the file, record and field."""
    import datasets

    try:
        if source.kind == "file":
            return _load_file(source, cache_dir, fmt, skip_invalid, counts, options)
        if source.kind == "saved":
            obj = datasets.load_from_disk(str(source.path))
            return _pick_split(obj, split, source)
        if source.kind == "hub":
            try:
                return datasets.load_dataset(source.spec, split=split, cache_dir=cache_dir)
            except ValueError as e:
                if "split" in str(e).lower():
                    raise DataError(f"{source.spec}: no split {split!r} ({e})") from None
                raise
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{source.label}: not found ({e})") from None
    except Exception as e:  # datasets' own errors: keep its message, name the source
        raise DataError(f"{source.label}: cannot load the dataset: {type(e).__name__}: "
                        f"{_short(e)}") from None
    raise DataError(f"{source.label}: unknown source kind {source.kind}")


def _short(e: BaseException, limit: int = 500) -> str:
    msg = str(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg += f" (caused by {type(cause).__name__}: {cause})"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _pick_split(obj, split: str, source: Source):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{source.label}: no split {split!r}; available: {', '.join(obj)}")
        return obj[split]
    return obj


def _load_file(source: Source, cache_dir, fmt, skip_invalid, counts, options=None):
    import datasets

    path = str(source.path)
    if source.builder == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DataError(f"{path}: empty CSV file (no header row)")
        if len(set(header)) != len(header):
            raise DataError(f"{path}: duplicate column names in the header {header}")
        features = datasets.Features({h: datasets.Value("string") for h in header})
        return datasets.load_dataset("csv", data_files=path, split="train", features=features,
                                     keep_default_na=False, cache_dir=cache_dir)
    if source.builder == "parquet":
        return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache_dir)
    # JSON / JSON Lines
    if not _has_content(path):
        raise DataError(f"{path}: empty dataset (the file has no records)")
    try:
        unsafe = _unsafe_for_arrow(path)
        if unsafe is not None:
            # pyarrow's JSON reader stores invalid UTF-8 unchecked (a crash later, deep in a
            # map) and segfaults on a non-object record (pyarrow 26: a JSON Lines file that
            # starts with `null`); the careful reader below names or skips those records
            raise DataError(f"{path}: {unsafe}")
        with _quiet_logger("datasets"):  # its error line would duplicate ours
            return datasets.load_dataset("json", data_files=path, split="train",
                                         cache_dir=cache_dir)
    except Exception as e:
        # Find the exact line/field with the json module; it also loads when skipping.
        records, bad = read_json_records(source, fmt, stop_at_first=not skip_invalid,
                                         options=options)
        if bad and not skip_invalid:
            raise DataError(bad[0]) from None
        if not bad:
            if fmt is None:
                raise DataError(f"{path}: cannot load the dataset: {type(e).__name__}: "
                                f"{_short(e)}") from None
            # datasets failed on something outside the format's fields (e.g. an extra column
            # whose type changes): keep only the format's fields.
        if counts is not None:
            counts["skipped"] += len(bad)
            counts["skipped_messages"].extend(bad[:MAX_ERRORS_SHOWN])
        if bad:
            log.warning("%s: skipped %d invalid record(s) (--skip-invalid); first: %s",
                        path, len(bad), bad[0])
        keep = list(fmt.fields) if fmt is not None and fmt.fields else None
        rows = [{k: rec.get(k) for k in keep} if keep else rec for _, rec in records]
        if not rows:
            raise DataError(f"{path}: no valid records")
        lines = [no for no, _ in records]
        source._lines = lines if all(no is not None for no in lines) else None
        try:
            return datasets.Dataset.from_list(rows)
        except Exception as e2:
            raise DataError(f"{path}: cannot load the dataset: {type(e).__name__}: {_short(e)}; "
                            f"reading only the fields {keep}: {_short(e2)}") from None


@contextlib.contextmanager
def _quiet_logger(name: str):
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)


def _unsafe_for_arrow(path: str) -> str | None:
    """Why the file must not reach pyarrow's JSON reader, or None: invalid UTF-8, or a record
    that is not a JSON object. One streaming pass (1 MiB at a time); a JSON document (``[...]``)
    is parsed with the json module to look at its elements."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"[":
        try:
            data = json.loads(Path(path).read_bytes())
        except (ValueError, RecursionError) as e:  # incl. UnicodeDecodeError
            return f"not a valid JSON document ({type(e).__name__})"
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            return "a record is not a JSON object"
        return None
    carry, no = b"", 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                dec.decode(chunk)
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                for line in lines:
                    no += 1
                    first = line.lstrip(b"\xef\xbb\xbf \t\r")[:1]
                    if first and first != b"{":
                        return f"line {no} is not a JSON object"
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not valid UTF-8"
    first = carry.lstrip(b"\xef\xbb\xbf \t\r")[:1]
    if first and first != b"{":
        return f"line {no + 1} is not a JSON object"
    return None


def _has_content(path: str) -> bool:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                return True
    return False


def read_json_records(source: Source, fmt: DatasetFormat | None, *, stop_at_first: bool,
                      options: dict | None = None
                      ) -> tuple[list[tuple[int | None, dict]], list[str]]:
    """Parse a JSON/JSONL file with the json module and check each record with the format.

    Returns (valid ``(line or None, record)`` pairs, error messages naming line, record, field).
    """
    path = source.path
    raw = path.read_bytes()
    records: list[tuple[int | None, Any]] = []
    bad: list[str] = []
    if raw.lstrip()[:1] == b"[":  # one JSON document
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            return [], [f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02X})"]
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]
        records = [(None, r) for r in data]
    else:
        # JSON Lines end at "\n" only (str.splitlines also splits at U+2028, U+0085, \x1c...,
        # which may appear raw inside a JSON string); a line of invalid UTF-8 is named or skipped
        for no, line_b in enumerate(raw.split(b"\n"), 1):
            try:
                line = line_b.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"{path}: line {no}: not valid UTF-8 (byte 0x{line_b[e.start]:02X} "
                           f"at byte {e.start + 1} of the line)")
                if stop_at_first:
                    return [], bad
                continue
            if not line.strip():
                continue
            try:
                records.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(f"{path}: line {no}: invalid JSON: {e.msg} (column {e.colno})")
                if stop_at_first:
                    return [], bad
    good = []
    for i, (no, rec) in enumerate(records):
        where = f"{path}: record {i}" + (f" (line {no})" if no else "")
        if not isinstance(rec, dict):
            bad.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
        elif (why := _invalid_unicode(rec)) is not None:
            bad.append(f"{where}: {why}")
        elif fmt is not None:
            try:
                _check_segments(fmt.segments(rec, options), fmt)
            except RecordError as e:
                bad.append(f"{where}: {e}")
            else:
                good.append((no, rec))
        else:
            good.append((no, rec))
        if bad and stop_at_first:
            return [], bad
    return good, bad


# ---------------------------------------------------------------------------------- tokenizing


@dataclass
class SplitStats:
    """Counts for one split; every record read ends in exactly one of used/dropped/skipped."""

    records: int = 0     # records read from the sources
    used: int = 0        # examples that train (or validate)
    truncated: int = 0   # used examples cut to max_seq_len
    dropped: int = 0     # valid records with no trainable target (after truncation)
    skipped: int = 0     # invalid records skipped with --skip-invalid
    tokens: int = 0      # tokens of the used examples (after truncation)
    trainable_tokens: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    dropped_messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TokenizedSplit:
    """A tokenized split: an Arrow-backed dataset with ``input_ids`` and ``loss_mask`` columns,
    plus the per-example lengths used to plan batches."""

    name: str
    dataset: Any  # datasets.Dataset
    lengths: np.ndarray
    stats: SplitStats

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        batch = self.dataset[list(indices)]
        return list(zip(batch["input_ids"], batch["loss_mask"]))


def _surrogate(text: str) -> str | None:
    """Where a string is not valid Unicode (a lone surrogate, e.g. from the JSON escape
    "\\ud800"): Arrow cannot store it and the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


def _invalid_unicode(rec: dict) -> str | None:
    for k, v in rec.items():
        if isinstance(v, str) and (why := _surrogate(v)) is not None:
            return f"field {k!r}: not valid Unicode: {why}"
    return None


def _check_segments(segs, fmt: DatasetFormat) -> list[Segment]:
    if not isinstance(segs, (list, tuple)) or not segs:
        raise RecordError(None, f"format {fmt.name!r} returned no segments")
    for i, s in enumerate(segs):
        if not isinstance(s, Segment) or not isinstance(s.text, str):
            raise RecordError(None, f"format {fmt.name!r} returned {s!r}, expected Segment(text: "
                                    "str, trainable: bool)")
        if (why := _surrogate(s.text)) is not None:
            raise RecordError(None, f"text of segment {i} is not valid Unicode: {why}")
    return list(segs)


TOKENIZE_VERSION = 1  # bump when the token layout below changes


def _sftctl_version() -> str:
    try:
        from importlib.metadata import version

        return version("sftctl")
    except Exception:
        return "unknown"


class _Tokenize:
    """The ``datasets.map`` function (a class so that it pickles for worker processes and hashes
    stably for the datasets cache)."""

    def __init__(self, fmt: DatasetFormat, tokenizer, max_seq_len: int, train_on_prompt: bool,
                 options: dict | None = None):
        self.fmt = fmt
        self.options = dict(options or {})
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_prompt = train_on_prompt
        self.bos = special_prefix(tokenizer)
        self.eos = tokenizer.eos_token_id
        # part of the datasets cache fingerprint: an sftctl upgrade that changes tokenization
        # must not reuse tables cached by an older version (the class is pickled by reference)
        self.pipeline_version = (TOKENIZE_VERSION, _sftctl_version())

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        n = len(indices)
        keys = list(batch)
        segs_all: list[list[Segment] | None] = []
        errors = [""] * n
        texts: list[str] = []
        for i in range(n):
            rec = {k: batch[k][i] for k in keys}
            try:
                segs = _check_segments(self.fmt.segments(rec, self.options), self.fmt)
            except RecordError as e:
                errors[i] = str(e)
                segs_all.append(None)
                continue
            except Exception as e:  # a bug in a format plugin: still name the record
                errors[i] = f"format {self.fmt.name!r} failed: {type(e).__name__}: {e}"
                segs_all.append(None)
                continue
            segs_all.append(segs)
            texts.extend(s.text for s in segs)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = {"input_ids": [], "loss_mask": [], "length": [], "full_length": [], "error": errors,
               "index": list(indices), "trainable": []}
        k = 0
        for i in range(n):
            segs = segs_all[i]
            ids: list[int] = list(self.bos)
            mask: list[int] = [0] * len(ids)
            if segs is not None:
                for s in segs:
                    toks = encoded[k]
                    k += 1
                    ids.extend(toks)
                    mask.extend([1 if (s.trainable or self.train_on_prompt) else 0] * len(toks))
                ids.append(self.eos)
                mask.append(1 if (segs[-1].trainable or self.train_on_prompt) else 0)
            full = len(ids)
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
            out["input_ids"].append(ids)
            out["loss_mask"].append(mask)
            out["length"].append(len(ids))
            out["full_length"].append(full)
            out["trainable"].append(sum(mask[1:]))  # position 0 is never a target
        return out


def special_prefix(tokenizer) -> list[int]:
    """The BOS the tokenizer puts in front of a text (empty list when it adds none)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def tokenize_split(name: str, parts: list[tuple[Source, Any]], fmt: DatasetFormat, tokenizer, *,
                   max_seq_len: int, train_on_prompt: bool, skip_invalid: bool, num_proc: int | None,
                   quiet: bool, pre_skipped: SplitStats | None = None,
                   options: dict | None = None) -> TokenizedSplit:
    """Validate and tokenize every source of a split; raise on invalid records unless skipping."""
    import datasets

    stats = pre_skipped or SplitStats()
    pieces = []
    for source, ds in parts:
        stats.records += len(ds)
        if len(ds) == 0:
            raise DataError(f"{source.label}: empty dataset (no records)")
        missing = [f for f in fmt.required if f not in ds.column_names]
        if missing:
            raise DataError(f"{source.label}: record 0: missing field {missing[0]!r} (format "
                            f"{fmt.name!r} needs {list(fmt.required)}; the data has columns "
                            f"{ds.column_names})")
        nproc = num_proc or (1 if len(ds) < 50_000 else min(8, os.cpu_count() or 1))
        fn = _Tokenize(fmt, tokenizer, max_seq_len, train_on_prompt, options)
        mapped = ds.map(fn, batched=True, batch_size=1000, with_indices=True,
                        remove_columns=ds.column_names, num_proc=nproc if nproc > 1 else None,
                        desc=f"tokenizing {name} ({Path(source.label).name})")
        errs = mapped.filter(lambda e: e != "", input_columns="error",
                             desc="checking records", num_proc=None)
        if len(errs):
            msgs = [f"{source.where(i)}: {e}" for i, e in zip(errs["index"][:MAX_ERRORS_SHOWN],
                                                              errs["error"][:MAX_ERRORS_SHOWN])]
            if not skip_invalid:
                more = f" (and {len(errs) - len(msgs)} more)" if len(errs) > len(msgs) else ""
                raise DataError(f"{len(errs)} invalid record(s){more}; fix them or pass "
                                "--skip-invalid:\n  " + "\n  ".join(msgs))
            stats.skipped += len(errs)
            stats.skipped_messages.extend(msgs)
            log.warning("%s: skipped %d invalid record(s) (--skip-invalid); first: %s",
                        source.label, len(errs), msgs[0])
            mapped = mapped.filter(lambda e: e == "", input_columns="error",
                                   desc="skipping invalid records")
        full = np.asarray(mapped["full_length"], dtype=np.int64)
        trainable = np.asarray(mapped["trainable"], dtype=np.int64)
        n_trunc = int((full > max_seq_len).sum())
        empty = trainable == 0
        if empty.any():
            idx = np.nonzero(empty)[0]
            orig = mapped.select(idx[:MAX_ERRORS_SHOWN])["index"]
            why = lambda j, o: (f"{source.where(o)}: no trainable token" +
                                (f" after truncation to {max_seq_len} tokens (had "
                                 f"{int(full[j])})" if full[j] > max_seq_len else ""))
            stats.dropped += int(empty.sum())
            stats.dropped_messages.extend(why(j, o) for j, o in zip(idx[:MAX_ERRORS_SHOWN], orig))
            n_trunc -= int((full[empty] > max_seq_len).sum())  # dropped ones are not "used"
            mapped = mapped.select(np.nonzero(~empty)[0])
            log.warning("%s: dropped %d example(s) with no trainable token; first: %s",
                        source.label, int(empty.sum()), stats.dropped_messages[0])
        stats.truncated += n_trunc
        if n_trunc:
            log.warning("%s (%s): truncated %d example(s) to max_seq_len=%d", source.label, name,
                        n_trunc, max_seq_len)
        pieces.append(mapped)
    ds = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    ds = ds.remove_columns([c for c in ("error",) if c in ds.column_names])
    lengths = np.asarray(ds["length"], dtype=np.int64)
    stats.used = len(ds)
    stats.tokens = int(lengths.sum())
    stats.trainable_tokens = int(np.asarray(ds["trainable"], dtype=np.int64).sum())
    if stats.used == 0:
        raise DataError(f"{name} split: no usable examples ({stats.records} records: "
                        f"{stats.skipped} invalid and skipped, {stats.dropped} without a "
                        "trainable token)")
    return TokenizedSplit(name, ds.with_format(None), lengths, stats)


def fraction_label(f: float) -> str:
    return f"{f:.1%}".replace(".0%", "%")


def hold_out(split: TokenizedSplit, fraction: float, seed: int, max_seq_len: int
             ) -> tuple[TokenizedSplit, TokenizedSplit]:
    """Split a tokenized split into (train, validation) by a seeded random fraction."""
    n = len(split)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise DataError(f"{n} example(s) are too few to hold out {fraction_label(fraction)} for "
                        "validation")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    parts = []
    for name, idx in (("train", np.sort(perm[n_val:])), ("validation", np.sort(perm[:n_val]))):
        ds = split.dataset.select(idx)
        full = np.asarray(ds["full_length"], dtype=np.int64)
        st = SplitStats(records=len(idx), used=len(idx), truncated=int((full > max_seq_len).sum()),
                        tokens=int(split.lengths[idx].sum()),
                        trainable_tokens=int(np.asarray(ds["trainable"]).sum()))
        parts.append(TokenizedSplit(name, ds, split.lengths[idx], st))
    train, val = parts
    # reading counts (invalid, dropped) belong to the records read, i.e. to the train side
    s0 = split.stats
    train.stats.records = s0.records - len(val)
    train.stats.skipped, train.stats.dropped = s0.skipped, s0.dropped
    train.stats.skipped_messages, train.stats.dropped_messages = (s0.skipped_messages,
                                                                  s0.dropped_messages)
    return train, val


# ------------------------------------------------------------------------------------ batching


@dataclass
class BatchPlan:
    """Deterministic micro-batch plan of one epoch.

    A micro-batch is a list of rows; a row is a list of example indices (one example when not
    packing). The global plan holds ``batch_size * world_size`` rows per micro-batch; rank r
    trains on rows ``[r * batch_size, (r + 1) * batch_size)`` of each, so the examples of one
    optimizer step are the same whatever the world size. The epoch's last micro-batch is split
    as evenly as possible; when it has fewer rows than ranks, the ranks left without a row get a
    ``FillerRow`` (no example is dropped, and every rank runs the same number of steps).
    """

    lengths: np.ndarray
    batch_size: int
    max_seq_len: int
    packing: bool
    seed: int
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.lengths))

    def rows(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch)
        if not self.packing:
            return [[int(i)] for i in order]
        return pack_first_fit(order, self.lengths, self.max_seq_len)

    def global_batches(self, epoch: int) -> list[list[list[int]]]:
        rows = self.rows(epoch)
        per = self.batch_size * self.world_size
        return [rows[i:i + per] for i in range(0, len(rows), per)]

    def batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches for ``epoch``."""
        out = []
        for b in self.global_batches(epoch):
            if self.world_size == 1:
                out.append(b)
                continue
            # split the (possibly short) last batch as evenly as possible
            k, r = divmod(len(b), self.world_size)
            if k == 0 and self.rank >= r:  # no row left for this rank in the tail batch
                out.append([FillerRow(b[0])])
                continue
            start = self.rank * k + min(self.rank, r)
            out.append(b[start:start + k + (1 if self.rank < r else 0)])
        return out

    def num_batches(self, epoch: int = 0) -> int:
        if not self.packing:
            n = len(self.lengths)
            per = self.batch_size * self.world_size
            return -(-n // per)
        return len(self.global_batches(epoch))


class FillerRow(list):
    """A copy of a real row for a rank that has none in the epoch's last micro-batch: the rank
    still runs forward/backward (the collectives of DDP/FSDP need every rank), but ``collate``
    masks all its targets, so it adds nothing to the loss or the gradient and is counted as
    neither an example nor a token."""


def pack_first_fit(order: Iterable[int], lengths: np.ndarray, capacity: int,
                   open_rows: int = 16) -> list[list[int]]:
    """Pack examples (in the given order) into rows of at most ``capacity`` tokens.

    First fit over a window of ``open_rows`` open rows keeps the order roughly random while
    filling rows well; when no open row fits, the fullest one is closed.
    """
    done: list[list[int]] = []
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = int(lengths[i])
        for j, s in enumerate(space):
            if n <= s:
                rows[j].append(int(i))
                space[j] -= n
                break
        else:
            if len(rows) >= open_rows:
                j = int(np.argmin(space))
                done.append(rows.pop(j))
                space.pop(j)
            rows.append([int(i)])
            space.append(capacity - n)
    done.extend(rows)
    return done


@dataclass
class Batch:
    """Tensors of one micro-batch. ``attention_mask`` is None for packed batches."""

    input_ids: Any       # [B, T] int64
    loss_mask: Any       # [B, T] int64
    attention_mask: Any  # [B, T] int64 or None
    position_ids: Any    # [B, T] int64 or None
    document_ids: Any    # [B, T] int64 or None
    num_tokens: int      # real (non-pad) tokens
    num_examples: int

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(mv(self.input_ids), mv(self.loss_mask), mv(self.attention_mask),
                     mv(self.position_ids), mv(self.document_ids), self.num_tokens,
                     self.num_examples)

    def model_inputs(self) -> dict:
        kw = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        return kw


def collate(split: TokenizedSplit, rows: list[list[int]], *, pad_id: int, packing: bool) -> Batch:
    """Build a micro-batch from rows of example indices (dynamic padding to the longest row)."""
    import torch

    flat = [i for row in rows for i in row]
    fetched = dict(zip(flat, split.rows(flat)))
    seqs, masks, pos, docs = [], [], [], []
    for row in rows:
        ids_r, m_r, p_r, d_r = [], [], [], []
        for d, i in enumerate(row):
            ids, m = fetched[i]
            ids_r.extend(ids)
            m_r.extend([0] * len(m) if isinstance(row, FillerRow) else m)
            p_r.extend(range(len(ids)))
            d_r.extend([d] * len(ids))
        seqs.append(ids_r), masks.append(m_r), pos.append(p_r), docs.append(d_r)
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((B, T), dtype=torch.long)        # [B, T]
    attn = torch.zeros((B, T), dtype=torch.long)             # [B, T]
    position_ids = torch.zeros((B, T), dtype=torch.long)     # [B, T]
    document_ids = torch.full((B, T), -1, dtype=torch.long)  # [B, T]; -1 = padding
    for b in range(B):
        n = len(seqs[b])
        input_ids[b, :n] = torch.tensor(seqs[b])
        loss_mask[b, :n] = torch.tensor(masks[b])
        attn[b, :n] = 1
        position_ids[b, :n] = torch.tensor(pos[b])
        # padding is its own "document" with positions restarting at 0, so the packed mask
        # derived from position ids keeps real tokens from attending to it
        position_ids[b, n:] = torch.arange(T - n)
        document_ids[b, :n] = torch.tensor(docs[b])
    real = [not isinstance(row, FillerRow) for row in rows]
    num_tokens = sum(len(s) for s, keep in zip(seqs, real) if keep)
    num_examples = sum(len(row) for row, keep in zip(rows, real) if keep)
    if packing:
        return Batch(input_ids, loss_mask, None, position_ids, document_ids, num_tokens,
                     num_examples)
    return Batch(input_ids, loss_mask, attn, None, None, num_tokens, num_examples)


# --------------------------------------------------------------------------- building the data


@dataclass
class PreparedData:
    train: TokenizedSplit
    val: TokenizedSplit | None
    sources: list[str]
    val_sources: list[str]
    format: str


def _validate_records_in_memory(records: Sequence[Mapping], name: str):
    import datasets

    if not records:
        raise DataError(f"{name}: empty dataset (no records)")
    try:
        return datasets.Dataset.from_list([dict(r) for r in records])
    except Exception as e:
        raise DataError(f"{name}: cannot build a dataset from the records: {e}") from None


def prepare_data(config, fmt: DatasetFormat, tokenizer, pm=None) -> PreparedData:
    """Load, validate and tokenize the train (and validation) data of a run config."""
    dc = config.data
    quiet = config.train.quiet
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    else:
        datasets.enable_progress_bars()

    def load_all(specs: list[str], split: str, stats: SplitStats) -> list[tuple[Source, Any]]:
        parts = []
        counts = {"skipped": 0, "skipped_messages": []}
        for spec in specs:
            ds = None
            if pm is not None:
                ds = pm.hook.sftctl_load_dataset(source=spec, config=config)
            if ds is not None:
                src = Source(spec, "plugin")
                if isinstance(ds, list):
                    ds = _validate_records_in_memory(ds, spec)
            else:
                src = resolve_source(spec)
                ds = load_source(src, split, cache_dir=dc.cache_dir, fmt=fmt,
                                 skip_invalid=dc.skip_invalid, counts=counts,
                                 options=config.options)
            parts.append((src, ds))
        stats.skipped += counts["skipped"]
        stats.records += counts["skipped"]
        stats.skipped_messages.extend(counts["skipped_messages"])
        return parts

    train_stats, val_stats = SplitStats(), SplitStats()
    if dc.paths:
        train_parts = load_all(dc.paths, dc.split, train_stats)
        sources = [s.label for s, _ in train_parts]
    else:
        if fmt.demo_data is None:
            raise DataError(f"no --data given and format {fmt.name!r} (plugin {fmt.plugin!r}) has "
                            "no demo data; pass --data PATH_OR_ID")
        demo = fmt.demo_data(config)
        train_parts = [(Source(f"demo:{fmt.name}:train", "demo"),
                        _validate_records_in_memory(demo["train"], f"{fmt.name} demo train"))]
        sources = [f"demo:{fmt.name}:train"]
    val_parts = []
    if dc.val_paths:
        val_parts = load_all(dc.val_paths, dc.split, val_stats)
    elif dc.val_split:
        if not dc.paths:
            raise DataError("--val-split needs --data sources with that split")
        val_parts = load_all(dc.paths, dc.val_split, val_stats)
    elif not dc.paths and dc.val_fraction == 0:
        demo_val = demo.get("validation")
        if demo_val:
            val_parts = [(Source(f"demo:{fmt.name}:validation", "demo"),
                          _validate_records_in_memory(demo_val, f"{fmt.name} demo validation"))]
    if dc.max_examples is not None:
        kept, total = [], 0
        for src, ds in train_parts:
            take = min(len(ds), dc.max_examples - total)
            if take > 0:
                kept.append((src, ds.select(range(take))))
                total += take
        if sum(len(d) for _, d in train_parts) > total:
            log.info("using the first %d training records (--max-examples)", total)
        train_parts = kept
    kw = dict(max_seq_len=dc.max_seq_len, train_on_prompt=dc.train_on_prompt,
              skip_invalid=dc.skip_invalid, num_proc=dc.num_proc, quiet=quiet,
              options=config.options)
    train = tokenize_split("train", train_parts, fmt, tokenizer, pre_skipped=train_stats, **kw)
    val = None
    if dc.val_fraction > 0:
        train, val = hold_out(train, dc.val_fraction, config.train.seed, dc.max_seq_len)
        return PreparedData(train, val, sources, [f"{fraction_label(dc.val_fraction)} of train"],
                            fmt.name)
    if val_parts:
        val = tokenize_split("validation", val_parts, fmt, tokenizer, pre_skipped=val_stats, **kw)
    return PreparedData(train, val, sources, [s.label for s, _ in val_parts], fmt.name)
