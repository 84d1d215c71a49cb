"""The data pipeline on real files: every source kind, exact token masks (prompt/response/EOS),
truncation and drop counts, hold-out, multi-process tokenization, caching and collation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sftctl.run.config import build_config
from sftctl.data import collate, resolve_source
from sftctl.training.trainer import prepare_run_data
from sftctl.errors import DataError
from sftctl.run.plugin_manager import get_plugin_manager

from sftctl_testutil import alpaca_records, build_tiny_base, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_base(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(entry_points=False)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    import datasets

    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def prep(pm, tok, paths, data=None, **kw):
    data_kw = {"paths": [str(p) for p in paths], **(data or {})}
    # no post-training benchmark: it would hold records of --data out of training
    cfg = build_config([("test", {"data": data_kw, "train": {"quiet": True, **kw},
                                  "eval": {"enabled": False}})], pm.config_options())
    return prepare_run_data(cfg, pm.dataset_formats()[cfg.data.format or "alpaca"], tok, pm)


def test_tokens_and_masks_are_exact(pm, tok, tmp_path):
    from sftctl.plugins.alpaca.demo_data import format_prompt

    rec = {"instruction": "Sort the words.", "input": "pear apple", "output": "apple pear"}
    rec2 = {"instruction": "Say hello.", "input": "", "output": "hello"}
    d = prep(pm, tok, [write_jsonl(tmp_path / "a.jsonl", [rec, rec2])])
    ids, mask = d.train.rows([0])[0]
    prompt = tok(format_prompt(rec), add_special_tokens=False)["input_ids"]
    resp = tok("apple pear", add_special_tokens=False)["input_ids"]
    assert ids == prompt + resp + [tok.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(resp) + 1)
    ids2, _ = d.train.rows([1])[0]
    assert tok.decode(ids2[:-1]) == format_prompt(rec2) + "hello"  # the no-input template
    assert "### Input" not in tok.decode(ids2)
    d = prep(pm, tok, [tmp_path / "a.jsonl"], data={"train_on_prompt": True})
    assert d.train.rows([0])[0][1] == [1] * len(ids)


def test_csv_parquet_json_array_and_saved_dataset(pm, tok, tmp_path):
    import datasets

    recs = alpaca_records(6)
    recs[1]["input"] = ""
    csv = tmp_path / "d.csv"
    import csv as csvmod

    with open(csv, "w", newline="") as f:
        w = csvmod.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(recs)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(recs))
    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(recs).to_parquet(str(pq))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs),
                          "test": datasets.Dataset.from_list(recs[:2])}).save_to_disk(str(saved))
    ref = prep(pm, tok, [write_jsonl(tmp_path / "d.jsonl", recs)]).train
    for path in (csv, arr, pq, saved):
        got = prep(pm, tok, [path]).train
        assert got.rows(range(6)) == ref.rows(range(6)), path
    both = prep(pm, tok, [csv, pq])
    assert both.train.stats.used == 12 and both.sources == [str(csv), str(pq)]
    val = prep(pm, tok, [saved], data={"val_split": "test"})
    assert val.val.stats.used == 2
    with pytest.raises(DataError, match="no split 'nope'; available: train, test"):
        prep(pm, tok, [saved], data={"split": "nope"})


def test_csv_numbers_stay_text(pm, tok, tmp_path):
    csv = tmp_path / "n.csv"
    csv.write_text("instruction,input,output\nAdd the numbers.,2 3,5\nSay 1.,,1\n")
    d = prep(pm, tok, [csv])
    assert d.train.stats.used == 2


def test_source_resolution_errors(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        resolve_source(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="data file not found: ./missing.jsonl"):
        resolve_source("./missing.jsonl")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        resolve_source(str(tmp_path / "dir"))
    assert resolve_source("someorg/some_dataset").kind == "hub"


def test_uncached_hub_dataset_fails_clearly_offline(pm, tok):
    with pytest.raises(DataError, match="sftctl-no-such-org/no-such-dataset: cannot load"):
        prep(pm, tok, ["sftctl-no-such-org/no-such-dataset"])


def test_truncation_drop_and_holdout_counts(pm, tok, tmp_path):
    recs = alpaca_records(40)
    recs.append({"instruction": "Repeat.", "input": "blue " * 300, "output": "blue"})  # dropped
    recs.append({"instruction": "Repeat.", "input": "", "output": "blue " * 300})  # truncated
    d = prep(pm, tok, [write_jsonl(tmp_path / "d.jsonl", recs)],
             data={"max_seq_len": 128, "val_fraction": 0.25})
    tr, va = d.train.stats, d.val.stats
    assert tr.used + va.used == 41 and va.used == 10
    assert tr.dropped == 1 and "record 40 (line 41)" in tr.dropped_messages[0]
    assert tr.truncated + va.truncated == 1
    assert max(d.train.lengths.max(), d.val.lengths.max()) <= 128


def test_multiprocess_tokenization_and_cache(pm, tok, tmp_path):
    recs = alpaca_records(64)
    one = prep(pm, tok, [write_jsonl(tmp_path / "a.jsonl", recs)], data={"num_proc": 1}).train
    two = prep(pm, tok, [write_jsonl(tmp_path / "b.jsonl", recs)], data={"num_proc": 2}).train
    assert one.rows(range(64)) == two.rows(range(64))
    # datasets' cache: tokenizing the same file again reuses the cached table
    again = prep(pm, tok, [tmp_path / "a.jsonl"], data={"num_proc": 1}).train
    files = lambda s: sorted(f["filename"] for f in s.dataset.cache_files)
    assert files(one) and files(again) == files(one)


def test_demo_data_splits(pm, tok):
    cfg = build_config([("t", {"train": {"quiet": True},
                               "options": {"alpaca.demo_train_size": 50,
                                           "alpaca.demo_heldout_size": 10}})],
                       pm.config_options())
    d = prepare_run_data(cfg, pm.dataset_formats()["alpaca"], tok, pm)
    assert d.train.stats.used == 50 and d.val.stats.used == 10
    assert d.sources == ["demo:alpaca:train"]


def test_collate_padded_and_packed(pm, tok, tmp_path):
    d = prep(pm, tok, [write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))]).train
    n = [int(x) for x in d.lengths[:3]]
    b = collate(d, [[0], [1], [2]], pad_id=tok.pad_token_id, packing=False)
    assert b.input_ids.shape == (3, max(n)) and b.position_ids is None
    assert b.attention_mask.sum(1).tolist() == n and b.num_tokens == sum(n)
    p = collate(d, [[0, 1], [2]], pad_id=tok.pad_token_id, packing=True)
    assert p.attention_mask is None and p.input_ids.shape == (2, n[0] + n[1])
    assert p.position_ids[0].tolist() == list(range(n[0])) + list(range(n[1]))
    assert p.document_ids[0].tolist() == [0] * n[0] + [1] * n[1]
    pad = n[0] + n[1] - n[2]
    assert p.document_ids[1, n[2]:].tolist() == [-1] * pad
    assert p.position_ids[1, n[2]:].tolist() == list(range(pad))  # padding: its own "document"
    assert int(p.loss_mask[1, n[2]:].sum()) == 0
    assert torch.equal(p.input_ids[0, :n[0]], b.input_ids[0, :n[0]])
    assert np.array_equal(p.loss_mask[0, n[0]:].numpy(), b.loss_mask[1, :n[1]].numpy())


def test_pad_token_fallback(tmp_path, pm):
    from transformers import AutoTokenizer

    from sftctl.training.model import load_tokenizer

    base = build_tiny_base(tmp_path / "b")
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = base / "special_tokens_map.json"
    if special.exists():
        m = json.loads(special.read_text())
        m.pop("pad_token", None)
        special.write_text(json.dumps(m))
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    cfg = build_config([("t", {"train": {"output_dir": str(tmp_path / "o")}})])
    tok = load_tokenizer(str(base), cfg.model)
    assert tok.pad_token == tok.unk_token == "<unk>"
