"""Hostile input for the dataset loaders and formats, generated with hypothesis.

Every case goes through the real entry point (``prepare_data``: file type detection, the
``datasets`` loader, the careful JSON reader, the alpaca format, tokenization, truncation) and
must end in exactly one of two ways:
- a ``DataError`` (the CLI's named, exit-2 error) whose message names the file or the split, or
- a tokenized split whose counts add up (every record read is used, dropped or skipped), whose
  examples fit ``max_seq_len`` and have at least one trainable target, and whose first batch
  gives a finite loss and finite gradients on the tiny model (no NaN step).
Anything else (an exception from Arrow, the tokenizer, the json module...) fails the test.

Inputs: random bytes under each supported suffix; records with wrong types, missing or extra
fields, NaN/inf, huge fields, unicode edge cases (lone surrogates, both escaped and as raw
invalid UTF-8, BOM, bidi overrides, U+2028 inside strings, combining marks, emoji), control
characters and NUL; prompts longer than ``max_seq_len``; CSV and Parquet with the same values.
Bounded: derandomized (the same cases in CI every time) and ~320 examples (about 30 s on two
cores); ``SFTCTL_FUZZ_SCALE`` / ``SFTCTL_FUZZ_RANDOM`` explore further.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sftctl.errors import DataError

from sftctl_testutil import build_tiny_base

GOOD = {"instruction": "Reverse the words.", "input": "red blue", "output": "blue red"}

EDGE_TEXT = ["", " ", "\t\n ", "\x00", "nul\x00inside", "\x1b[31mred\x1b[0m", "\u202eevil\u202c",
             "\ufeffbom", "e\u0301\u0301\u0301", "\U0001F600\U0001F469\u200d\U0001F52C",
             "line\u2028sep\u2029para\x85nel", "cr\rlf\r\n", "\x0b\x0c\x1c\x1d\x1e", "\ud800",
             "x\udfffy", "\ufffd\uffff", "\U0010FFFF", "ﷺ" * 40, "word " * 600,
             "{\"nested\": \"json\"}", "Below is an instruction ### Response:"]

# CI runs a fixed set of cases; explore further locally with, e.g.,
# SFTCTL_FUZZ_SCALE=10 SFTCTL_FUZZ_RANDOM=1 pytest tests/test_fuzz.py
SCALE = float(os.environ.get("SFTCTL_FUZZ_SCALE", "1"))
settings_ = dict(deadline=None, derandomize=os.environ.get("SFTCTL_FUZZ_RANDOM") != "1",
                 database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.large_base_example,
                                        HealthCheck.function_scoped_fixture])

texts = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None),
            max_size=12),  # includes surrogates and unassigned code points
    st.sampled_from(EDGE_TEXT),
    st.integers(2_000, 150_000).map(lambda n: "long " * (n // 5)),  # far past max_seq_len
    st.integers(2_000, 150_000).map(lambda n: "x" * n),             # one huge "word"
)
wrong = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                  st.floats(allow_nan=True, allow_infinity=True),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                       st.integers(), max_size=2))
values = st.one_of(texts, texts, wrong)
nonblank = texts.map(lambda t: t if t.strip() else t + "x")
# weighted towards records the format accepts, so that most cases reach tokenization, truncation
# and a training step (hostile text inside valid structure is the hard part)
hostile_valid = st.fixed_dictionaries({"instruction": nonblank, "output": nonblank},
                                      optional={"input": texts, "extra": wrong})
records = st.one_of(
    st.just(GOOD), hostile_valid,
    st.fixed_dictionaries({"instruction": values, "output": values},
                          optional={"input": values, "extra": wrong}),
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "Output", ""]), values,
                    max_size=4),
    wrong,  # a JSON value that is not an object
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftctl.run.plugin_manager import get_plugin_manager

    tmp = tmp_path_factory.mktemp("fuzz")
    base = build_tiny_base(tmp / "base")
    pm = get_plugin_manager(entry_points=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    for name in ("sftctl", "datasets", "transformers"):  # expected warnings: skipped, dropped...
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    return {"tmp": tmp, "pm": pm, "fmt": pm.dataset_formats()["alpaca"],
            "tok": AutoTokenizer.from_pretrained(base), "model": model,
            "counter": itertools.count()}


def new_path(env, suffix: str) -> Path:
    return env["tmp"] / f"case{next(env['counter'])}{suffix}"


def check(env, path: Path, *, skip_invalid: bool, max_seq_len: int) -> None:
    """The property: a named DataError, or a consistent, trainable split."""
    from sftctl.run.config import build_config
    from sftctl.data import collate
    from sftctl.training.trainer import prepare_run_data
    from sftctl.training.loss import sft_labels, token_loss

    cfg = build_config([("fuzz", {
        "data": {"paths": [str(path)], "skip_invalid": skip_invalid, "max_seq_len": max_seq_len,
                 "cache_dir": str(env["tmp"] / "cache"), "num_proc": 1},
        "train": {"quiet": True, "output_dir": str(env["tmp"] / "out")}})],
        env["pm"].config_options())
    try:
        data = prepare_run_data(cfg, env["fmt"], env["tok"], env["pm"])
    except DataError as e:
        msg = str(e)
        assert path.name in msg or "train split" in msg, msg
        event("named DataError: " + re.sub(r"\S*case\d+\S*|\d+", "#", msg)[:70])
        return
    split = data.train
    s = split.stats
    event(f"usable split ({'some' if s.dropped + s.skipped else 'no'} records dropped/skipped)")
    assert s.records == s.used + s.dropped + s.skipped, s
    assert s.used == len(split) > 0
    assert (split.lengths <= max_seq_len).all() and (split.lengths >= 1).all()
    trainable = split.dataset["trainable"]
    assert min(trainable) >= 1
    vocab = len(env["tok"])
    for ids, mask in split.rows(range(len(split))):
        assert len(ids) == len(mask) and max(ids) < vocab and set(mask) <= {0, 1}
    # one real training step on the first batch: a finite loss and finite gradients
    model = env["model"]
    batch = collate(split, [[i] for i in range(min(4, len(split)))],
                    pad_id=env["tok"].pad_token_id, packing=False)
    labels, n = sft_labels(batch, "fused")
    assert int(n) >= 1
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs()).logits  # [B, T, V]
    loss = token_loss(logits, labels, n.to(torch.float32), "fused")
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- JSON / JSONL


def write_records(path: Path, recs, ensure_ascii: bool, as_array: bool) -> None:
    if as_array:
        text = json.dumps(recs, ensure_ascii=ensure_ascii, indent=1)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=ensure_ascii) for r in recs) + "\n"
    # surrogatepass: a lone surrogate written raw is invalid UTF-8 in the file, as it would be
    # from a broken exporter
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))


@settings(max_examples=int(200 * SCALE), **settings_)
@given(recs=st.one_of(st.lists(hostile_valid, min_size=1, max_size=5),
                      st.lists(records, min_size=1, max_size=6)), skip=st.booleans(),
       max_seq_len=st.sampled_from([32, 128, 256]), ensure_ascii=st.booleans(),
       as_array=st.booleans())
@example(recs=[GOOD, {**GOOD, "output": "\ud800"}], skip=False, max_seq_len=256,
         ensure_ascii=True, as_array=False)
@example(recs=[GOOD, {**GOOD, "input": "a\udfffb"}], skip=True, max_seq_len=256,
         ensure_ascii=False, as_array=False)
@example(recs=[{**GOOD, "input": "a\u2028b\x85c"}, {**GOOD, "output": float("nan")}],
         skip=True, max_seq_len=256, ensure_ascii=False, as_array=False)
@example(recs=[{**GOOD, "instruction": "long " * 5000}], skip=False, max_seq_len=48,
         ensure_ascii=True, as_array=False)
@example(recs=[GOOD, {**GOOD, "instruction": "long " * 5000}], skip=False, max_seq_len=48,
         ensure_ascii=True, as_array=True)
def test_json_records(env, recs, skip, max_seq_len, ensure_ascii, as_array):
    path = new_path(env, ".json" if as_array else ".jsonl")
    write_records(path, recs, ensure_ascii, as_array)
    check(env, path, skip_invalid=skip, max_seq_len=max_seq_len)


# ------------------------------------------------------------------------------ raw bytes


@settings(max_examples=int(80 * SCALE), **settings_)
@given(raw=st.one_of(st.binary(max_size=600),
                     st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n",
                                               b"\\u", b"d800", b"NaN", b"\xff", b"\x00",
                                               b'"instruction"', b'"output"', b'"x"', b"1",
                                               b"\xef\xbb\xbf", b"\r\n"]),
                              max_size=60).map(b"".join)),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]), skip=st.booleans())
@example(raw=b"[" * 100_000, suffix=".json", skip=False)
@example(raw=b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n", suffix=".jsonl", skip=False)
@example(raw=b"instruction,output\nx,y\n\x00,z\n", suffix=".csv", skip=False)
@example(raw=b"PAR1" + b"\x00" * 64 + b"PAR1", suffix=".parquet", skip=False)
@example(raw=b"", suffix=".jsonl", skip=True)
def test_random_bytes(env, raw, suffix, skip):
    path = new_path(env, suffix)
    path.write_bytes(raw)
    check(env, path, skip_invalid=skip, max_seq_len=256)


# --------------------------------------------------------------------------- CSV and Parquet


@settings(max_examples=int(40 * SCALE), **settings_)
@given(recs=st.lists(st.fixed_dictionaries({"instruction": values, "output": values},
                                           optional={"input": values}), min_size=1, max_size=5),
       kind=st.sampled_from(["csv", "parquet"]), skip=st.booleans(),
       max_seq_len=st.sampled_from([8, 256]))
def test_csv_and_parquet(env, recs, kind, skip, max_seq_len):
    path = new_path(env, f".{kind}")
    cols = sorted({k for r in recs for k in r})
    if kind == "csv":  # CSV holds strings: the hostile part is the text (NUL, newlines, quotes)
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in recs:
                w.writerow(["" if r.get(c) is None else str(r.get(c)) for c in cols])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:  # mixed types per column cannot be written: such a file cannot exist
            pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in recs]),
                           path)
        except (pa.ArrowException, OverflowError, UnicodeError):  # then the values as JSON text
            pq.write_table(pa.Table.from_pylist([{c: json.dumps(r.get(c), ensure_ascii=True)
                                                  for c in cols} for r in recs]), path)
    check(env, path, skip_invalid=skip, max_seq_len=max_seq_len)
