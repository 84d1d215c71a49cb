"""The run's JSON files are strict JSON, also when the last step was skipped by the non-finite
guard (``SFTCTL_FAULT=nan_at_step:N`` makes step N's logits NaN through the real forward and
backward): summary.json (and model/sftctl_summary.json) name the last finite loss and its step
with a reason, metrics.jsonl and report.json (the real ``sftctl report``) hold no NaN/Infinity
token; a parser that rejects them reads every file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sftctl_testutil import cli_env, read_metrics, run_cli
from sftctl_testutil import no_installed_plugins, tiny_alpaca_setup  # noqa: F401 (autouse)

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_alpaca_setup(tmp_path_factory, "strict_json")


def strict_load(text: str):
    """``json.loads`` that refuses the NaN/Infinity/-Infinity tokens Python writes by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_strict_loader_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_load('{"final_loss": NaN}')
    with pytest.raises(ValueError, match="Infinity"):
        strict_load('[Infinity]')


def test_last_step_nonfinite_gives_strict_files_and_the_last_finite_loss(setup, tmp_path):
    tmp, base, data = setup
    out = tmp_path / "run"
    r = run_cli(["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--seed", "5",
                 "--threads", "1", "--device", "cpu", "--no-eval", "--on-nonfinite", "skip"],
                env=cli_env(tmp, SFTCTL_FAULT=f"nan_at_step:{STEPS}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {STEPS}: non-finite loss (nan)" in r.stderr
    # the report of the run (the real command), written from these files
    r = run_cli(["report", str(out), "--quiet"], env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]

    for name in ("summary.json", "model/sftctl_summary.json", "report.json"):
        strict_load((out / name).read_text(encoding="utf-8"))  # raises on NaN/Infinity
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines and all(strict_load(line) is not None for line in lines)

    train = [m for m in read_metrics(out) if m["kind"] == "train"]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    assert train[-1]["loss"] is None and train[-1]["loss_nonfinite"] == "nan"
    summary = strict_load((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == STEPS and summary["nonfinite_skipped"] == 1
    # the last finite loss, at its step, and why it is not the last step's
    assert summary["final_loss"] == train[-2]["loss"] and math.isfinite(summary["final_loss"])
    assert summary["final_loss_step"] == STEPS - 1
    assert f"({STEPS}) had a non-finite loss" in summary["final_loss_reason"]
    inner = strict_load((out / "model" / "sftctl_summary.json").read_text(encoding="utf-8"))
    assert (inner["final_loss"], inner["final_loss_step"]) == (summary["final_loss"], STEPS - 1)
    report = strict_load((out / "report.json").read_text(encoding="utf-8"))
    assert report["run"]["final_loss_step"] == STEPS - 1
    assert report["training"]["train"][-1]["loss"] is None
    assert report["training"]["train"][-1]["loss_nonfinite"] == "nan"


def test_final_loss_fields():
    from sftctl.training.trainer import _final_loss, _strict_json

    nan = float("nan")
    h = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": nan}, {"step": 3, "loss": 1.5}]
    assert _final_loss(h) == {"final_loss": 1.5, "final_loss_step": 3, "final_loss_reason": None}
    h = [{"step": 1, "loss": nan}, {"step": 2, "loss": float("inf")}]
    got = _final_loss(h)
    assert got["final_loss"] is None and got["final_loss_step"] is None
    assert "all 2 logged step(s) had a non-finite loss" in got["final_loss_reason"]
    assert _final_loss([])["final_loss_reason"] == "no training step was logged"
    s = _strict_json({"val_loss": nan, "x": {"y": [1.0, -float("inf")]}, "ok": 1.0})
    assert s == {"val_loss": None, "val_loss_nonfinite": "nan", "x": {"y": [1.0, None]},
                 "ok": 1.0}
    json.dumps(s, allow_nan=False)
