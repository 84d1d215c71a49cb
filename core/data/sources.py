"""Data sources: files, saved datasets and hub ids loaded through ``datasets``, with every bad
record named by file, record index and line.

Design choices
- Sources go through ``datasets`` (and its cache): JSON/JSONL/Parquet/CSV files, a directory
  written by ``save_to_disk``, or a hub id. A plugin can load anything else through the
  firstresult hook ``sftctl_load_dataset`` (called by ``sftctl.data.prepare_data``). Each source
  is loaded and validated on its own, so every error names the file and the record index (plus
  the line for JSON Lines).
- When ``datasets`` cannot parse a JSON file (a broken line, a field whose type changes between
  records) the file is re-read with the ``json`` module to name the exact line and field; with
  ``--skip-invalid`` that careful reader is also the fallback loader (bad records are counted).
- CSV columns are read as strings (no "42" -> int guessing, empty cells stay ""); a UTF-8 BOM
  before the header is dropped (Excel writes one), so the first column keeps its name.
- A file without an extension is sniffed: ``{``/``[`` first is JSON (Lines), ``PAR1`` Parquet;
  anything else is an error listing the known extensions (CSV is not guessed: any text parses).
- UTF-16/UTF-32 input (a byte-order mark, or NUL bytes between ASCII characters) is named as
  such with the conversion to do, rather than reported as invalid UTF-8 or invalid JSON.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, SftctlError
from .formats import DatasetFormat, RecordError, format_bug, invalid_unicode

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
        if builder is None and not p.suffix:
            builder = _sniff(p)
        if builder is None:
            kind = f"file type {p.suffix!r}" if p.suffix else \
                "file without an extension (and its content is neither JSON nor Parquet)"
            raise DataError(f"{p}: unsupported data {kind}; use "
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


def _sniff(p: Path) -> str | None:
    """The builder of an extension-less file from its first bytes, or None."""
    with open(p, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"PAR1":
        return "parquet"
    if _wide_encoding(head) is not None:
        return "json"  # let _load_file name the encoding
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return "json" if first in (b"{", b"[") else None


def _wide_encoding(head: bytes) -> tuple[str, str] | None:
    """(description, iconv name) when the first bytes are UTF-16/32, else None. Without a BOM:
    ASCII text in UTF-16 has a NUL in every other byte, which UTF-8 text (JSON, CSV) never has."""
    for bom, name, iconv in ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian", "UTF-32"),
                             (b"\x00\x00\xfe\xff", "UTF-32 (big-endian", "UTF-32"),
                             (b"\xff\xfe", "UTF-16 (little-endian", "UTF-16"),
                             (b"\xfe\xff", "UTF-16 (big-endian", "UTF-16")):
        if head.startswith(bom):
            return f"{name}, with a byte-order mark)", iconv
    h = head[:64] if len(head) >= 4 else b""
    h = h[:len(h) // 2 * 2]
    if h and not any(h[1::2]) and all(h[0::2]):
        return "UTF-16 (little-endian, no byte-order mark)", "UTF-16LE"
    if h and not any(h[0::2]) and all(h[1::2]):
        return "UTF-16 (big-endian, no byte-order mark)", "UTF-16BE"
    return None


def _check_utf8_family(path: str) -> None:
    with open(path, "rb") as f:
        enc = _wide_encoding(f.read(64))
    if enc is not None:
        raise DataError(f"{path}: the file is {enc[0]}; sftctl reads UTF-8 text: convert it "
                        f"first, e.g. iconv -f {enc[1]} -t UTF-8 {path} > converted"
                        f"{Path(path).suffix}")


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
    except SftctlError:  # already named (DataError; a format plugin's bug)
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
    if source.builder in ("csv", "json"):
        _check_utf8_family(path)
    if source.builder == "csv":
        # utf-8-sig: a BOM would otherwise become part of the first column's name
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = csv.reader(f)
                header = next(rows, None)
                has_record = any(rows)  # blank lines are [] (pandas skips them too)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not header:
            raise DataError(f"{path}: empty CSV file (no header row)")
        if len(set(header)) != len(header):
            raise DataError(f"{path}: duplicate column names in the header {header}")
        if not has_record:  # datasets would say 'Instruction "train" corresponds to no data'
            raise DataError(f"{path}: empty dataset (the CSV file has a header row "
                            f"{header} but no records)")
        features = datasets.Features({h: datasets.Value("string") for h in header})
        return datasets.load_dataset("csv", data_files=path, split="train", features=features,
                                     keep_default_na=False, encoding="utf-8-sig",
                                     cache_dir=cache_dir)
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
        elif (why := invalid_unicode(rec)) is not None:
            bad.append(f"{where}: {why}")
        elif fmt is not None:
            try:
                fmt.check(rec, options)
            except RecordError as e:
                bad.append(f"{where}: {e}")
            except Exception as e:  # a plugin bug, not bad data: never counted as invalid
                raise format_bug(fmt, where, e) from e
            else:
                good.append((no, rec))
        else:
            good.append((no, rec))
        if bad and stop_at_first:
            return [], bad
    return good, bad
