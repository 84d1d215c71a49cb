"""The data layer's typed config (the ``data:`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_field import config_field as _f


@dataclass
class DataConfig:
    paths: list[str] = _f(
        factory=list, flag="--data", cli="nargs", metavar="PATH_OR_ID",
        help="Training data: JSON, JSONL, Parquet or CSV files, a saved `datasets` directory, or a "
             "hub dataset id (several allowed). Default: the demo data of the --plugin format.")
    val_paths: list[str] = _f(
        factory=list, flag="--val-data", cli="nargs", metavar="PATH_OR_ID",
        help="Validation data, same kinds as --data.")
    format: str | None = _f(
        None, flag="--format",
        help="Dataset format (registered by a plugin, see `sftctl plugins`). Default: the format "
             "of the first --plugin that registers one, else 'alpaca'.")
    split: str = _f("train", flag="--split",
                    help="Split to train on for hub ids and saved DatasetDicts.")
    val_split: str | None = _f(
        None, flag="--val-split",
        help="Split of the --data sources used for validation (hub ids, saved DatasetDicts).")
    val_fraction: float = _f(
        0.0, flag="--val-fraction", minimum=0.0, maximum=0.5,
        help="Hold out this fraction of the training records for validation when no "
             "validation data is given (0: no validation set).")
    max_seq_len: int = _f(1024, flag="--max-seq-len", minimum=2,
                          help="Tokens per example (and per packed row); longer examples are "
                               "truncated and counted.")
    packing: bool = _f(
        False, flag="--packing", cli="bool",
        help="Padding-free packing: concatenate examples into rows of --max-seq-len tokens, "
             "position ids restart per document and attention never crosses documents.")
    train_on_prompt: bool = _f(False, flag="--train-on-prompt", cli="bool",
                               help="Also compute the loss on prompt tokens (default: response only).")
    skip_invalid: bool = _f(
        False, flag="--skip-invalid", cli="store_true",
        help="Skip invalid records (counted in the summary) instead of stopping with an error.")
    num_proc: int | None = _f(
        None, flag="--num-proc", minimum=1,
        help="Processes for tokenization (datasets.map). Default: 1 below 50k records, else "
             "min(8, CPU count).")
    max_examples: int | None = _f(None, flag="--max-examples", minimum=1,
                                  help="Use at most this many training records (after loading).")
    cache_dir: str | None = _f(None, flag="--cache-dir",
                               help="datasets cache directory (default: the datasets default).")
