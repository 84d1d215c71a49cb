"""Reliability, round 2 (issue 16), the messages that sent users the wrong way, on the real CLI:

- metrics.jsonl is strict JSON even when a step's loss or gradient norm is non-finite (null plus a
  ``<key>_nonfinite`` flag), through a resume (the file is rewritten from the checkpoint's
  history) and the report;
- a checkpoint without tokenizer files, a model that needs custom code, a missing path given to
  ``--model``/``--tokenizer``/``sftctl eval``: messages that name the directory, the missing
  files, ``--trust-remote-code``, "not found: PATH";
- data files: a CSV header with a UTF-8 BOM, a header-only CSV, a file without an extension,
  UTF-16 input;
- ``sftctl report`` on a directory that is not a run, ``--eval-every`` without a validation set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftctl_testutil import alpaca_records, cli_env, write_jsonl
from sftctl_testutil import no_installed_plugins, tiny_alpaca_setup  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_alpaca_setup(tmp_path_factory, "reliability3")


def train_args(setup, out: Path, *extra, model=None, data=None) -> list[str]:
    tmp, base, d = setup
    return ["train", "--model", str(model or base), "--data", str(data or d),
            "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4",
            "--lr", "3e-3", "--seed", "5", "--scheduler", "constant", "--threads", "1",
            "--device", "cpu", "--no-eval", "--no-initial-eval", *extra]


def run(args, tmp, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftctl", *args], env=cli_env(tmp, **env),
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSON Lines file through a strict parser (NaN/Infinity refused)."""
    return [json.loads(x, parse_constant=_refuse)
            for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def model_without(base: Path, dest: Path, names) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(*names))
    return dest


# ------------------------------------------------------------------------- metrics.jsonl: JSON


def test_nonfinite_metrics_are_null_plus_a_flag():
    from sftctl.plugins.metrics_jsonl import dumps

    line = dumps({"step": 3, "loss": float("nan"), "grad_norm": float("inf"),
                  "lr": 1e-3, "extra": {"x": float("-inf")}, "xs": [1.0, float("nan")]})
    rec = json.loads(line, parse_constant=_refuse)
    assert rec == {"step": 3, "loss": None, "loss_nonfinite": "nan", "grad_norm": None,
                   "grad_norm_nonfinite": "inf", "lr": 1e-3,
                   "extra": {"x": None, "x_nonfinite": "-inf"}, "xs": [1.0, None],
                   "xs_nonfinite": "nan"}


def test_metrics_jsonl_stays_strict_json_through_resume_and_report(setup, tmp_path):
    """A skipped NaN step (loss and grad norm NaN), a resume that rewrites the file from the
    checkpoint's history, then `sftctl report`: every line parses strictly, the step is null
    plus a flag, and the report reads it (curve without it, a warning naming it)."""
    out = tmp_path / "run"
    args = train_args(setup, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0",
                      "--on-nonfinite", "skip")
    r = run(args, tmp_path, SFTCTL_FAULT="nan_at_step:2")
    assert r.returncode == 0, r.stderr[-3000:]

    def check(rows):
        train = [x for x in rows if x["kind"] == "train"]
        assert [x["step"] for x in train] == [1, 2, 3, 4, 5, 6]
        bad = train[1]
        assert bad["loss"] is None and bad["loss_nonfinite"] == "nan"
        assert bad["grad_norm"] is None and bad["grad_norm_nonfinite"] == "nan"
        assert bad["skipped_nonfinite"] is True
        assert all(isinstance(x["loss"], float) and "loss_nonfinite" not in x
                   for x in train if x["step"] != 2)

    check(strict_lines(out / "metrics.jsonl"))
    # lose the end of the run: --resume restores the history (with its NaN) from step 4
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    r = run([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-00000004" in r.stderr
    check(strict_lines(out / "metrics.jsonl"))

    r = run(["report", str(out), "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"), parse_constant=_refuse)
    rows = {x["step"]: x for x in rep["training"]["train"]}
    assert rows[2]["loss"] is None and rows[2]["loss_nonfinite"] == "nan"
    assert isinstance(rows[3]["loss"], float)
    assert "metrics.jsonl: non-finite loss at 1 step(s) (2); not plotted" in rep["warnings"]
    assert not any("unreadable line" in w for w in rep["warnings"])


# ------------------------------------------------------------------------ model and tokenizer


def test_a_checkpoint_without_tokenizer_files_is_named(setup, tmp_path):
    tmp, base, data = setup
    notok = model_without(base, tmp_path / "notok", ["tokenizer*"])
    r = run(["eval", str(notok), "--base", "none", "--tasks", "alpaca_exact_match"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"the checkpoint {notok} has no tokenizer files (none of tokenizer.json, " \
           "tokenizer_config.json, tokenizer.model" in r.stderr
    assert "sentencepiece" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "notok-eval").exists()  # nothing written for a refused input
    # training from it: the same, and --tokenizer is the way out
    r = run(train_args(setup, tmp_path / "a", model=notok), tmp_path)
    assert r.returncode == 2 and f"the model {notok} has no tokenizer files" in r.stderr, r.stderr
    assert "or pass --tokenizer PATH_OR_ID" in r.stderr
    # a tokenizer_config.json alone (no vocabulary): what is there and what is missing
    cfg_only = model_without(base, tmp_path / "cfg_only", ["tokenizer.json"])
    r = run(train_args(setup, tmp_path / "b", model=cfg_only), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"cannot load the tokenizer of {cfg_only}: it has no vocabulary file (none of " \
           "tokenizer.json" in r.stderr and "it has tokenizer_config.json)" in r.stderr
    assert "sentencepiece or tiktoken" not in r.stderr


def test_remote_code_names_the_flag_and_the_custom_classes(setup, tmp_path):
    """A local model whose config maps to a custom class (auto_map; no network involved)."""
    tmp, base, data = setup
    custom = tmp_path / "custom"
    shutil.copytree(base, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["model_type"] = "custom_llama"  # unknown to transformers: only the custom code loads it
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        "    model_type = 'custom_llama'\n")
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import "
        "CustomConfig\n\n\nclass CustomForCausalLM(LlamaForCausalLM):\n"
        "    config_class = CustomConfig\n")
    r = run(train_args(setup, tmp_path / "a", model=custom), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"the model {custom} needs custom code from the directory {custom} (config.json: " \
           "AutoConfig -> configuration_custom.CustomConfig; config.json: AutoModelForCausalLM " \
           "-> modeling_custom.CustomForCausalLM); sftctl does not run it by default: " \
           "review that code, then pass --trust-remote-code" in r.stderr
    assert "trust_remote_code=True" not in r.stderr
    r = run(train_args(setup, tmp_path / "b", "--trust-remote-code", "--max-steps", "1",
                       model=custom), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]  # the flag named is the one that works


def test_path_or_hub_id_rules():
    from sftctl.errors import ModelError
    from sftctl.training.model import resolve_path_or_id

    for hub in ("gpt2", "Qwen/Qwen2.5-0.5B", "org_x/name.v2"):
        assert resolve_path_or_id(hub, "model") == hub
    for path in ("./x", "../x", "/nonexistent/x", "~/nonexistent-sftctl", "a/b/c", "x/",
                 "a\\b", "org/na me"):
        with pytest.raises(ModelError, match=f"model path not found: {path}"):
            resolve_path_or_id(path, "model")


def test_missing_paths_are_not_found_not_hub_errors(setup, tmp_path):
    tmp, base, data = setup
    (tmp_path / "models").mkdir()  # so models/nope is a local path, not the hub id models/nope
    hub_words = ("huggingface.co", "Repo id", "repo_id", "couldn't connect")
    r = run(train_args(setup, tmp_path / "a", model="models/nope"), tmp_path, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "model path not found: models/nope (read as a local path because the directory " \
           "models/ exists here" in r.stderr
    assert not any(w in r.stderr for w in hub_words), r.stderr
    for tok in ("./tok", str(tmp_path / "no_tok"), "models/tok"):
        r = run(train_args(setup, tmp_path / "b", "--tokenizer", tok), tmp_path, cwd=tmp_path)
        assert r.returncode == 2 and f"tokenizer path not found: {tok}" in r.stderr, r.stderr
        assert not any(w in r.stderr for w in hub_words), r.stderr
    r = run(["eval", "models/nope", "--base", "none"], tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "checkpoint path not found: models/nope" in r.stderr, r.stderr
    # ORG/NAME with no local ORG directory is still a hub id (offline here: the hub's message)
    r = run(train_args(setup, tmp_path / "c", model="some-org/some-model"), tmp_path,
            cwd=tmp_path)
    assert r.returncode == 2 and "'some-org/some-model'" in r.stderr, r.stderr
    assert "path not found" not in r.stderr


# ------------------------------------------------------------------------------------ data files


def preview(setup, data: Path, tmp) -> subprocess.CompletedProcess:
    tmp0, base, _ = setup
    return run(["data", "preview", "--model", str(base), "--data", str(data), "--num", "1",
                "--json"], tmp)


def test_a_csv_header_with_a_bom_keeps_its_first_column(setup, tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeffinstruction,input,output\nSay hi,,hi\n".encode("utf-8"))
    r = preview(setup, f, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ex = json.loads(r.stdout.splitlines()[0])
    assert "### Instruction:\nSay hi" in ex["text"] and "\ufeff" not in ex["text"]


def test_a_header_only_csv_is_an_empty_dataset(setup, tmp_path):
    f = tmp_path / "header.csv"
    f.write_text("instruction,input,output\n\n")
    r = preview(setup, f, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{f}: empty dataset (the CSV file has a header row ['instruction', 'input', " \
           "'output'] but no records)" in r.stderr


def test_a_file_without_an_extension_is_sniffed_or_named(setup, tmp_path):
    recs = alpaca_records(3, seed=2)
    jsonl = write_jsonl(tmp_path / "train_data", recs)
    r = preview(setup, jsonl, tmp_path)
    assert r.returncode == 0 and recs[0]["output"] in r.stdout, r.stderr[-3000:]
    doc = tmp_path / "doc"
    doc.write_text(json.dumps(recs))
    assert preview(setup, doc, tmp_path).returncode == 0
    text = tmp_path / "notes"
    text.write_text("instruction,input,output\na,,b\n")
    r = preview(setup, text, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{text}: unsupported data file without an extension (and its content is neither " \
           "JSON nor Parquet); use .csv, .json, .jsonl, .ndjson, .parquet files" in r.stderr


@pytest.mark.parametrize("name,encoding,what,iconv", [
    ("u16.jsonl", "utf-16", "UTF-16 (little-endian, with a byte-order mark)", "UTF-16"),
    ("u16.csv", "utf-16", "UTF-16 (little-endian, with a byte-order mark)", "UTF-16"),
    ("u16le.jsonl", "utf-16-le", "UTF-16 (little-endian, no byte-order mark)", "UTF-16LE"),
    ("u16be.json", "utf-16-be", "UTF-16 (big-endian, no byte-order mark)", "UTF-16BE"),
])
def test_utf16_input_is_named_as_utf16(setup, tmp_path, name, encoding, what, iconv):
    recs = alpaca_records(3, seed=2)
    f = tmp_path / name
    if name.endswith(".csv"):
        text = "instruction,input,output\n" + "".join(
            f"{r['instruction']},,{r['output']}\n" for r in recs)
    elif name.endswith(".json"):
        text = json.dumps(recs)
    else:
        text = "".join(json.dumps(r) + "\n" for r in recs)
    f.write_bytes(text.encode(encoding))
    r = preview(setup, f, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{f}: the file is {what}; sftctl reads UTF-8 text: convert it first, e.g. " \
           f"iconv -f {iconv} -t UTF-8 {f}" in r.stderr
    assert "not valid UTF-8" not in r.stderr and "invalid JSON" not in r.stderr


# ------------------------------------------------------------------------- report, --eval-every


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"\xff\xd8")
    for d in (empty, other):
        before = sorted(p.name for p in d.rglob("*"))
        r = run(["report", str(d)], tmp_path)
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"{d} is not a run directory: it has none of summary.json, metrics.jsonl, " \
               "eval/manifest.json" in r.stderr
        assert sorted(p.name for p in d.rglob("*")) == before  # nothing written


def test_eval_every_without_a_validation_set_is_an_error(setup, tmp_path):
    tmp, base, data = setup
    r = run(train_args(setup, tmp_path / "a", "--eval-every", "3", "--print-config"), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "command line: --eval-every 3 (eval.every) asks for the validation loss every 3 " \
           "steps but there is no validation set: give --val-data, --val-split or " \
           "--val-fraction, or drop --eval-every" in r.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text("eval:\n  every: 2\n")
    r = run(train_args(setup, tmp_path / "b", "--config", str(cfg), "--print-config"), tmp_path)
    assert r.returncode == 2 and f"{cfg}: --eval-every 2 (eval.every)" in r.stderr, r.stderr
    # with a validation set it runs; --no-eval (the benchmarks) is no conflict with it
    r = run(train_args(setup, tmp_path / "c", "--eval-every", "2", "--val-fraction", "0.25"),
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    vals = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
            if '"val"' in x]
    assert [v["step"] for v in vals] == [2, 4]
    assert "--no-eval turns off the post-training benchmarks and report only; validation " \
           "still runs every 2 steps (--eval-every)" in r.stderr  # the pair is named
    # a format's tuned eval.every (its demo has validation) does not make --data fail
    r = run(["train", "--plugin", "alpaca", "--data", str(data), "--output-dir",
             str(tmp_path / "d"), "--print-config"], tmp_path)
    assert r.returncode == 0 and "every: 500" in r.stdout, r.stderr[-3000:]
