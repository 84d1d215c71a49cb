"""The data layer: one entry point, :func:`prepare_data`, from a ``DataConfig`` to tokenized
train/validation splits; batching in :mod:`sftctl.data.batching`.

Layout (each module depends only on those above it)
- ``formats``: what a dataset-format plugin registers (``DatasetFormat``, ``Segment``,
  ``RecordError``).
- ``sources``: reading files, saved datasets and hub ids, with record-level errors.
- ``encode``: records -> segments -> token ids + loss mask, with counted truncations and drops.
- ``batching``: deterministic padded/packed micro-batch plans and collation.

Design choices
- ``prepare_data`` gets the parts it needs (the data section of the config, the format, the
  tokenizer, the plugin options and an optional loader for sources a plugin knows), not the run
  config or the plugin manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import DataError
from .batching import Batch, BatchPlan, FillerRow, collate, pack_first_fit
from .encode import (SplitStats, TokenizedSplit, fraction_label, hold_out, special_prefix,
                     tokenize_split)
from .formats import DatasetFormat, RecordError, Segment
from .sources import Source, load_source, resolve_source

log = logging.getLogger("sftctl")

# --------------------------------------------------------------------------- building the data


@dataclass
class PreparedData:
    train: TokenizedSplit
    val: TokenizedSplit | None
    sources: list[str]
    val_sources: list[str]
    format: str
    heldout: list[dict] | None = None  # records held out for the benchmark (never trained on)


def benchmark_slice_size(n: int, size: int | None) -> int:
    """Records held out of ``n`` for the post-training benchmark: ``size`` when given (0: none),
    else 5% of the records, at most 200 (none below 20 records)."""
    if size is not None:
        return size
    return min(200, n // 20)


def _take_heldout(parts: list, size: int | None, seed: int) -> tuple[list, list[dict]]:
    """Take a seeded random slice of records out of the training sources, before tokenization,
    so the benchmark never sees a trained record."""
    import numpy as np

    total = sum(len(ds) for _, ds in parts)
    k = benchmark_slice_size(total, size)
    if k <= 0:
        return parts, []
    if k >= total:
        raise DataError(f"eval.heldout_size: {k} held-out records leave none of the {total} "
                        "training records")
    chosen = set(np.random.default_rng([seed, 15]).permutation(total)[:k].tolist())
    kept, held, offset = [], [], 0
    for src, ds in parts:
        idx = range(offset, offset + len(ds))
        keep = [i - offset for i in idx if i not in chosen]
        held += [dict(ds[i - offset]) for i in idx if i in chosen]
        kept.append((src, ds.select(keep) if len(keep) < len(ds) else ds))
        offset += len(ds)
    return kept, held


def _validate_records_in_memory(records: Sequence[Mapping], name: str):
    import datasets

    if not records:
        raise DataError(f"{name}: empty dataset (no records)")
    try:
        return datasets.Dataset.from_list([dict(r) for r in records])
    except Exception as e:
        raise DataError(f"{name}: cannot build a dataset from the records: {e}") from None


def prepare_data(dc, fmt: DatasetFormat, tokenizer, *, seed: int, options: Mapping[str, Any],
                 quiet: bool = False, plugin_loader: Callable[[str], Any] | None = None,
                 demo_data: Callable[[], Mapping[str, Sequence[Mapping]]] | None = None,
                 heldout_size: int | None | bool = False) -> PreparedData:
    """Load, validate and tokenize the train (and validation) data.

    ``dc``: the ``DataConfig``; ``seed``: of the ``--val-fraction`` hold-out; ``options``: the
    plugin options (formats read theirs there); ``plugin_loader(source)``: a dataset for a
    source a plugin knows, or None (the ``sftctl_load_dataset`` hook); ``demo_data()``: the
    format's demo records, used when ``dc.paths`` is empty. ``heldout_size``: hold a slice of
    the ``--data`` records out of training for the post-training benchmark (``False``: none;
    ``None``: :func:`benchmark_slice_size`'s default; an int: that many), returned as
    ``PreparedData.heldout``.
    """
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    else:
        datasets.enable_progress_bars()

    def load_all(specs: list[str], split: str, stats: SplitStats) -> list[tuple[Source, Any]]:
        parts = []
        counts = {"skipped": 0, "skipped_messages": []}
        for spec in specs:
            ds = plugin_loader(spec) if plugin_loader is not None else None
            if ds is not None:
                src = Source(spec, "plugin")
                if isinstance(ds, list):
                    ds = _validate_records_in_memory(ds, spec)
            else:
                src = resolve_source(spec)
                ds = load_source(src, split, cache_dir=dc.cache_dir, fmt=fmt,
                                 skip_invalid=dc.skip_invalid, counts=counts,
                                 options=options)
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
        if demo_data is None:
            raise DataError(f"no --data given and format {fmt.name!r} (plugin {fmt.plugin!r}) has "
                            "no demo data; pass --data PATH_OR_ID")
        demo = demo_data()
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
    heldout = None
    if heldout_size is not False and dc.paths:
        train_parts, heldout = _take_heldout(train_parts, heldout_size, seed)
        if not heldout:
            log.warning("no records held out for the post-training benchmark of your data "
                        "(fewer than 20 records or --heldout-size 0): give --heldout FILE or "
                        "--val-data to benchmark it")
        else:
            log.info("held out %d of the --data records for the post-training benchmark "
                     "(--heldout-size N to change, --heldout FILE to give them, --no-eval: none)",
                     len(heldout))
    kw = dict(max_seq_len=dc.max_seq_len, train_on_prompt=dc.train_on_prompt,
              skip_invalid=dc.skip_invalid, num_proc=dc.num_proc, quiet=quiet,
              options=options)
    train = tokenize_split("train", train_parts, fmt, tokenizer, pre_skipped=train_stats, **kw)
    val = None
    if dc.val_fraction > 0:
        train, val = hold_out(train, dc.val_fraction, seed, dc.max_seq_len)
        return PreparedData(train, val, sources, [f"{fraction_label(dc.val_fraction)} of train"],
                            fmt.name, heldout)
    if val_parts:
        val = tokenize_split("validation", val_parts, fmt, tokenizer, pre_skipped=val_stats, **kw)
    return PreparedData(train, val, sources, [s.label for s, _ in val_parts], fmt.name, heldout)
