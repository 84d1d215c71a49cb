"""Encoding: records -> format segments -> token ids and a loss mask, with every count kept.

Design choices
- A dataset format (a plugin) turns a record into segments; tokenization happens in one
  ``datasets.map`` (batched, ``num_proc`` workers) that never raises: it returns an ``error``
  column, so errors from worker processes arrive intact, can be listed several at a time, and
  ``--skip-invalid`` can drop exactly those records and count them.
- Only ``RecordError`` means invalid data. Anything else ``to_segments`` raises is a bug of the
  plugin: it goes to a separate ``crash`` column, is never skipped, and the first one is raised
  as a ``PluginHookError`` naming the plugin, the format and the record; the failing record is
  run through the format once more in this process so the exception carries a real traceback
  (the worker's message is kept if it does not fail again).
- Tokens: BOS (when the tokenizer adds one) + each segment tokenized without special tokens +
  EOS; ``loss_mask`` marks response tokens (and the EOS after a trainable segment). Segments are
  tokenized separately so the prompt/response boundary is exact in tokens.
- Each example carries a 64-bit digest of its ids and mask (``digest`` column), so the data
  fingerprint that ``--resume`` compares covers the tokens, not only their counts.
- Truncation to ``max_seq_len`` keeps the beginning, is counted, and an example left with no
  trainable target is dropped and counted. Nothing is dropped silently: ``SplitStats`` carries
  every count into the summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .formats import (DatasetFormat, RecordError, Segment, check_segments, format_bug,
                      invalid_unicode)
from .sources import MAX_ERRORS_SHOWN, Source

log = logging.getLogger("sftctl")

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


TOKENIZE_VERSION = 3  # bump when the token layout below changes (3: the digest column)


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
        crashes = [""] * n
        texts: list[str] = []
        if self.fmt.to_tokens is not None:
            return self._encode_tokens(batch, indices)
        for i in range(n):
            rec = {k: batch[k][i] for k in keys}
            try:
                segs = check_segments(self.fmt.segments(rec, self.options), self.fmt)
            except RecordError as e:
                errors[i] = str(e)
                segs_all.append(None)
                continue
            except Exception as e:  # a bug in the format plugin, not invalid data
                crashes[i] = f"{type(e).__name__}: {e}"
                segs_all.append(None)
                continue
            segs_all.append(segs)
            texts.extend(s.text for s in segs)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = {"input_ids": [], "loss_mask": [], "length": [], "full_length": [], "error": errors,
               "crash": crashes, "index": list(indices), "trainable": [], "digest": []}
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
            self._append(out, ids, mask)
        return out

    def _append(self, out: dict, ids: list[int], mask: list[int]) -> None:
        """One example, truncated to max_seq_len (the full length is kept for the counts)."""
        full = len(ids)
        ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["length"].append(len(ids))
        out["full_length"].append(full)
        out["trainable"].append(sum(mask[1:]))  # position 0 is never a target
        # 64-bit hash of exactly what trains (ids and mask): resume compares the data by these,
        # computed here, where the example is in hand anyway (see checkpoint.data_fingerprint)
        h = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8)
        h.update(bytes(mask))
        out["digest"].append(int.from_bytes(h.digest(), "little", signed=True))

    def _encode_tokens(self, batch: dict, indices: list[int]) -> dict:
        """Token-level formats: the format renders ids and mask itself (no BOS/EOS added)."""
        n = len(indices)
        keys = list(batch)
        errors, crashes = [""] * n, [""] * n
        out = {"input_ids": [], "loss_mask": [], "length": [], "full_length": [], "error": errors,
               "crash": crashes, "index": list(indices), "trainable": [], "digest": []}
        for i in range(n):
            rec = {k: batch[k][i] for k in keys}
            ids: list[int] = []
            mask: list[int] = []
            try:
                ids, mask = self.fmt.to_tokens(rec, self.tokenizer, self.options)
                ids, mask = list(ids), [int(bool(m)) for m in mask]
                if len(ids) != len(mask) or not ids:
                    raise ValueError(f"to_tokens returned {len(ids)} ids and {len(mask)} mask "
                                     "values (expected the same non-zero number)")
            except RecordError as e:
                errors[i] = str(e)
                ids, mask = [], []
            except Exception as e:  # a bug in the format plugin, not invalid data
                crashes[i] = f"{type(e).__name__}: {e}"
                ids, mask = [], []
            if self.train_on_prompt and ids:
                mask = [1] * len(ids)
            self._append(out, ids, mask)
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
        problems = mapped.filter(lambda e, c: e != "" or c != "", input_columns=["error", "crash"],
                                 desc="checking records", num_proc=None)
        crashed = [(i, c) for i, c in zip(problems["index"], problems["crash"]) if c]
        if crashed:
            raise _plugin_bug(fmt, source, ds, *crashed[0], options)
        errs = problems  # only invalid records are left
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
    ds = ds.remove_columns([c for c in ("error", "crash") if c in ds.column_names])
    lengths = np.asarray(ds["length"], dtype=np.int64)
    stats.used = len(ds)
    stats.tokens = int(lengths.sum())
    stats.trainable_tokens = int(np.asarray(ds["trainable"], dtype=np.int64).sum())
    if stats.used == 0:
        raise DataError(f"{name} split: no usable examples ({stats.records} records: "
                        f"{stats.skipped} invalid and skipped, {stats.dropped} without a "
                        "trainable token)")
    return TokenizedSplit(name, ds.with_format(None), lengths, stats)


def _plugin_bug(fmt: DatasetFormat, source: Source, ds, index: int, message: str,
                options: dict | None) -> Exception:
    """The error for a record whose ``to_segments`` crashed (see module doc)."""
    error: Exception = RuntimeError(message)
    try:
        fmt.check(ds[int(index)], dict(options or {}))
    except RecordError:
        pass  # not reproducible here: keep the worker's message
    except Exception as e:
        error = e
    exc = format_bug(fmt, source.where(int(index)), error)
    exc.__cause__ = error
    return exc


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
