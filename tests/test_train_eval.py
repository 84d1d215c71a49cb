"""``sftctl train`` with the post-training evaluation on, end to end: the real CLI trains a tiny
model on the alpaca demo data, then lm-eval benchmarks the base model and the checkpoint and the
report is written. Once in one process and once on 2 gloo ranks under torchrun (rank 0
evaluates). Each run takes about half a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from sftctl.plugins.alpaca.tasks import CHOICE_TASK, EXACT_MATCH_TASK  # noqa: E402

from sftctl_testutil import build_tiny_base, cli_env, read_metrics, run_cli  # noqa: E402
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

LIMIT = 4  # --eval-limit: examples per benchmark
STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("train_eval") / "base")


def train_args(base: Path, out: Path, batch_size: int) -> list[str]:
    # no --data: the alpaca demo data trains, its held-out split validates and is benchmarked
    return ["train", "--plugin", "alpaca", "--model", str(base), "--output-dir", str(out),
            "--alpaca-demo-train-size", "32", "--alpaca-demo-heldout-size", "8",
            "--max-steps", str(STEPS), "--batch-size", str(batch_size), "--lr", "5e-3",
            "--seed", "2", "--eval-limit", str(LIMIT)]


def gold_loglikelihoods(run_dir: Path, label: str) -> list[float]:
    """lm-eval's logged log-likelihood of the correct choice, per document."""
    (path,) = (run_dir / "eval" / label / CHOICE_TASK).glob("samples_*.jsonl")
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    return [float(d["filtered_resps"][d["doc"]["gold"]][0]) for d in docs]


def check_report(out: Path, base: Path) -> dict:
    """The report compares base and SFT on both alpaca benchmarks with lm-eval's own figures."""
    for name in ("report.json", "report.md", "report.html", "summary.json", "model"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    bench = report["benchmarks"]
    assert bench["labels"] == ["base", "sft"] and bench["errors"] == []
    assert bench["models"]["base"]["path"] == str(base.resolve())
    assert bench["models"]["sft"]["path"] == str((out / "model").resolve())
    rows = {(r["task"], r["metric"]): r for r in bench["table"]}
    assert set(rows) == {(EXACT_MATCH_TASK, "exact_match"), (CHOICE_TASK, "acc"),
                         (CHOICE_TASK, "acc_norm")}
    for (task, metric), row in rows.items():
        assert row["status"] == {"base": "ok", "sft": "ok"}, row
        for label in ("base", "sft"):
            (path,) = (out / "eval" / label / task).glob("results_*.json")
            lm = json.loads(path.read_text())
            assert lm["n-samples"][task]["effective"] == LIMIT  # --eval-limit reached lm-eval
            assert row[label] == lm["results"][task][f"{metric},none"]
        assert row["delta"] == pytest.approx(row["sft"] - row["base"])
    # the SFT column scored the trained checkpoint, not the base again: after a few steps on the
    # demo data the reference answers are more likely
    base_ll, sft_ll = gold_loglikelihoods(out, "base"), gold_loglikelihoods(out, "sft")
    assert len(base_ll) == LIMIT and sum(sft_ll) > sum(base_ll), (base_ll, sft_ll)
    md = (out / "report.md").read_text()
    assert "## Benchmarks: base vs SFT" in md
    for task, metric in rows:
        assert f"| {task} | {metric} |" in md
    return report


def test_train_then_benchmark_and_report_in_one_process(base, tmp_path):
    out = tmp_path / "run"
    r = run_cli(train_args(base, out, batch_size=4), env=cli_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    report = check_report(out, base)
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == \
        list(range(1, STEPS + 1))
    assert report["training"]["train_points"] == STEPS


def test_train_then_benchmark_and_report_on_two_gloo_ranks(base, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "sftctl", *train_args(base, out, batch_size=2)]
    r = subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    check_report(out, base)
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == STEPS
    # rank 0 alone evaluated: one lm-eval result per model and task
    assert len(list((out / "eval").glob("*/*/results_*.json"))) == 4
