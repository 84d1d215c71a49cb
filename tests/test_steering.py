"""Evaluation that steers the run (sftctl.evals.steering) through the real CLI on a tiny local
model: --benchmark-every (scores per step, losses identical to a run without it), --select-best
(model/ holds the chosen step's weights, the final model in model_final/), --require gates (exit
0 / 5 with everything written; bad gates named before training), and report.json against the
published JSON Schema (real reports validate; broken ones do not)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics,  # noqa: E402
                             run_cli, write_jsonl)

jsonschema = pytest.importorskip("jsonschema")

from sftctl.evals import steering  # noqa: E402
from sftctl.evals.runner import EXIT_GATE_FAILED  # noqa: E402

# With these 57 training records, 3 held-out ones and lr 0.1 (the records and slice a run on
# alpaca_records(60) with the default seed holds out), the step-2 model has a lower held-out NLL
# than the final one (lm-eval: 5.005 vs 5.352 on the CPU), so --select-best must swap model/
# (on the CPU also on a GPU machine: bit-identical losses and the measured ranking hold there)
TRAIN = ["--max-steps", "4", "--batch-size", "4", "--lr", "0.1", "--keep-last", "0",
         "--device", "cpu"]
SELECT = "heldout_nll:nll_per_token"


def _split(records: list[dict], k: int = 3, seed: int = 42) -> tuple[list[dict], list[dict]]:
    import numpy as np

    chosen = set(np.random.default_rng([seed, 15]).permutation(len(records))[:k].tolist())
    return ([r for i, r in enumerate(records) if i not in chosen],
            [r for i, r in enumerate(records) if i in chosen])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steering")
    base = build_tiny_base(tmp / "base")
    train, held_records = _split(alpaca_records(60))
    data = write_jsonl(tmp / "train.jsonl", train)
    held = write_jsonl(tmp / "held.jsonl", held_records)
    common = ["--model", str(base), "--data", str(data), *TRAIN]
    steered = tmp / "steered"
    env = cli_env(tmp, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    r = run_cli(["train", *common, "--heldout", str(held), "--output-dir", str(steered),
                 "--report-to", "tensorboard,mlflow,wandb", "--benchmark-every", "2",
                 "--select-best", SELECT, "--require", "heldout_nll:nll_per_token:delta<0",
                 "--require", "heldout_generate:chrf>=0"], env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    # the same run without any benchmark (checkpoints at the same steps)
    plain = tmp / "plain"
    r2 = run_cli(["train", *common, "--no-eval", "--save-every", "2", "--output-dir", str(plain)],
                 env=cli_env(tmp))
    assert r2.returncode == 0, r2.stderr[-4000:]
    return {"tmp": tmp, "base": base, "data": data, "held": held, "steered": steered,
            "plain": plain, "stderr": r.stderr}


def _weights(path: Path) -> dict:
    from sftctl.training.checkpoint import load_weights

    return load_weights(path)


def _same_tensors(a: dict, b: dict) -> None:
    import torch

    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _schema() -> dict:
    import sftctl.evals

    return json.loads((Path(sftctl.evals.__file__).parent / "report.schema.json")
                      .read_text(encoding="utf-8"))


def _validate(report: dict) -> None:
    jsonschema.Draft202012Validator(_schema(), format_checker=jsonschema.FormatChecker()) \
        .validate(report)


def test_benchmark_every_records_scores_per_step_and_leaves_training_unchanged(runs):
    out = runs["steered"]
    summary = json.loads((out / "summary.json").read_text())
    points = summary["steering"]["points"]
    assert [(p["step"], p["model"]) for p in points] == [(2, "checkpoint"), (4, "final")]
    for p in points:
        assert p["errors"] == {}
        assert set(p["scores"]) == {"heldout_generate", "heldout_nll"}
        assert p["scores"]["heldout_nll"]["nll_per_token"] > 0
        assert p["higher_is_better"]["heldout_nll"]["nll_per_token"] is False
    # each point is lm-eval's own results file of that step's model
    (res,) = (out / "eval" / "steps" / "step-00000002" / "eval" / "sft" / "heldout_nll"
              ).glob("results_*.json")
    lm = json.loads(res.read_text())["results"]["heldout_nll"]["nll_per_token,none"]
    assert points[0]["scores"]["heldout_nll"]["nll_per_token"] == lm
    # the benchmarks changed nothing in training: same losses and gradient norms bit for bit,
    # and the final weights of the two runs are identical
    steered = [m for m in read_metrics(out) if m["kind"] == "train"]
    plain = [m for m in read_metrics(runs["plain"]) if m["kind"] == "train"]
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in steered] == \
        [(m["step"], m["loss"], m["grad_norm"]) for m in plain]
    _same_tensors(_weights(out / "model_final" / "model.safetensors"),
                  _weights(runs["plain"] / "model" / "model.safetensors"))
    assert "step 2: benchmarked" in runs["stderr"]
    # the report plots the scores against the step next to the loss
    report = json.loads((out / "report.json").read_text())
    assert report["plots"]["benchmark_steps"] == "report_assets/benchmark_steps.png"
    assert (out / "report_assets" / "benchmark_steps.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "### Benchmarks during training" in md and "| 2 | checkpoint |" in md
    assert 'id="plot-benchmark-steps"' in (out / "report.html").read_text()


def _series(out: Path) -> dict[str, dict[int, float]]:
    """``benchmark_steps/<task>/<metric>`` -> {step: score} from eval/steps.json (the steps
    and the final model)."""
    points = json.loads((out / "eval" / "steps.json").read_text())["points"]
    assert [(p["step"], p["model"]) for p in points] == [(2, "checkpoint"), (4, "final")]
    want: dict[str, dict[int, float]] = {}
    for p in points:
        for task, scores in p["scores"].items():
            for key, v in scores.items():
                if v is not None:
                    tag = f"benchmark_steps/{task}/{key.replace(',', '_')}"
                    want.setdefault(tag, {})[p["step"]] = v
    assert "benchmark_steps/heldout_nll/nll_per_token" in want and len(want) >= 3
    return want


def test_benchmark_scores_reach_the_tracker_at_their_steps(runs):
    """Each point of eval/steps.json (the steps and the final model) is in TensorBoard's event
    file as ``benchmark_steps/<task>/<metric>`` at its step, read back with TensorBoard's own
    reader."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runs["steered"]
    want = _series(out)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag, by_step in want.items():
        assert tag in tags, (tag, sorted(tags))
        got = {e.step: e.value for e in ea.Scalars(tag)}
        # TensorBoard stores float32: the exact float32 of each score, once per step
        assert got == {s: float(np.float32(v)) for s, v in by_step.items()}, tag
    # the step metrics are still there, and the full table keeps its own names
    assert "train/loss" in tags and "benchmark/heldout_nll/nll_per_token/sft" in tags


def test_benchmark_scores_reach_mlflow_and_wandb(runs, monkeypatch):
    """The same series in MLflow's file store (its client) and W&B's offline run (its protobuf
    records, parsed as in test_trackers.py)."""
    import glob

    from mlflow.tracking import MlflowClient

    from test_trackers import _wandb_records

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = runs["steered"]
    want = _series(out)
    state = json.loads((out / "trackers" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    for tag, by_step in want.items():
        hist = client.get_metric_history(state["run_id"], tag)
        assert {m.step: m.value for m in hist} == by_step, tag
    (path,) = glob.glob(str(out / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    got: dict[str, dict[int, float]] = {}
    for rec in _wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
            for tag in want:
                if tag in row:
                    got.setdefault(tag, {})[row["_step"]] = row[tag]
    assert got == want


def test_trackers_log_the_scores_after_evals_benchmarked_the_checkpoint():
    """pluggy calls trylast implementations after the plain ones: each tracker's
    sftctl_checkpoint_saved runs after evals' (which benchmarks and writes steps.json)."""
    from sftctl.run.plugin_manager import get_plugin_manager

    pm = get_plugin_manager(entry_points=False)
    order = [i.plugin_name for i in reversed(pm.hook.sftctl_checkpoint_saved.get_hookimpls())]
    for name in ("tensorboard", "wandb", "mlflow"):
        assert order.index(name) > order.index("evals"), order


def test_steering_files_are_strict_json(runs):
    """Every JSON file the steered run rewrote (summary.json with the series and gates,
    eval/steps.json, model/ and model_final/'s sftctl_summary.json, report.json, metrics.jsonl)
    holds no NaN/Infinity token."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    out = runs["steered"]
    for name in ("summary.json", "eval/steps.json", "model/sftctl_summary.json",
                 "model_final/sftctl_summary.json", "report.json"):
        json.loads((out / name).read_text(encoding="utf-8"), parse_constant=refuse)
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line, parse_constant=refuse)


def test_select_best_puts_the_best_step_in_model(runs):
    from sftctl.training.atomic import checkpoint_complete

    out = runs["steered"]
    st = json.loads((out / "summary.json").read_text())["steering"]
    scores = {p["step"]: p["scores"]["heldout_nll"]["nll_per_token"] for p in st["points"]}
    best = min(scores, key=lambda s: (scores[s], -s))  # lower is better; ties: later step
    sel = st["selected"]
    assert (sel["step"], sel["score"], sel["metric"]) == (best, scores[best], "nll_per_token")
    assert best == 2 and sel["model"] == "checkpoint" and sel["final_dir"] == "model_final"
    # model/ holds the weights of step 2 (the resumable checkpoint of that step), complete
    model = _weights(out / "model" / "model.safetensors")
    ckpt = _weights(out / "checkpoints" / "step-00000002" / "model.safetensors")
    # (the HF file stores tied weights once: lm_head.weight is the embedding there)
    _same_tensors(model, {k: ckpt[k] for k in model})
    assert checkpoint_complete(out / "model") and checkpoint_complete(out / "model_final")
    inner = json.loads((out / "model" / "sftctl_summary.json").read_text())
    assert inner["selected"]["step"] == 2
    # the full benchmark describes model/: its held-out NLL is step 2's (all 3 documents)
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["benchmarks"]["table"]
               if (r["task"], r["metric"]) == ("heldout_nll", "nll_per_token"))
    assert row["sft"] == scores[2]
    assert report["steering"]["selected"]["step"] == 2
    assert "Selected (`--select-best heldout_nll:nll_per_token`): **step 2**" in \
        (out / "report.md").read_text()
    # only the selected step's model was kept while training, and none after the swap
    assert not list((out / "eval" / "steps").glob("step-*/model"))


def test_gates_pass_and_are_recorded(runs):
    st = json.loads((runs["steered"] / "summary.json").read_text())["steering"]
    assert st["gates_passed"] is True
    g = {x["gate"]: x for x in st["gates"]}
    delta = g["heldout_nll:nll_per_token:delta<0"]
    assert delta["kind"] == "delta" and delta["passed"]
    assert delta["value"] == pytest.approx(delta["sft"] - delta["base"])
    assert "all passed" in (runs["steered"] / "report.md").read_text()


def test_a_failed_gate_exits_5_after_writing_everything(runs, tmp_path):
    from sftctl.training.atomic import checkpoint_complete

    out = tmp_path / "gated"
    r = run_cli(["train", "--model", str(runs["base"]), "--data", str(runs["data"]),
                 "--heldout", str(runs["held"]), "--max-steps", "2", "--batch-size", "4",
                 "--lr", "5e-3", "--device", "cpu", "--output-dir", str(out),
                 "--require", "heldout_nll:nll_per_token:delta>0",    # NLL goes down: fails
                 "--require", "heldout_nll:perplexity<1e9"], env=cli_env(tmp_path))
    assert r.returncode == EXIT_GATE_FAILED == 5, r.stderr[-3000:]
    assert "gate heldout_nll:nll_per_token:delta>0: FAILED" in r.stderr
    assert checkpoint_complete(out / "model")
    st = json.loads((out / "summary.json").read_text())["steering"]
    assert st["gates_passed"] is False and st["points"] == [] and st["selected"] is None
    assert [x["passed"] for x in st["gates"]] == [False, True]
    report = json.loads((out / "report.json").read_text())
    _validate(report)
    assert report["steering"]["gates"][0]["value"] < 0
    assert "**FAILED**" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert 'id="gates-block"' in html and "<strong>FAILED</strong>" in html
    assert (out / "model" / "README.md").is_file()


def test_unknown_gate_metric_after_the_benchmark_names_the_gate(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["steered"], run)
    from sftctl.evals.runner import load_run_config

    cfg, _ = load_run_config(run)
    cfg.eval.require = ["heldout_nll:nll_per_tokn<=3"]
    assert steering.check_gates(run, cfg) == steering.EXIT_GATE_INVALID == 2
    (g,) = json.loads((run / "summary.json").read_text())["steering"]["gates"]
    assert "--require 'heldout_nll:nll_per_tokn<=3'" in g["error"]
    assert "nll_per_token" in g["error"] and not g["passed"]


@pytest.mark.parametrize("args, message", [
    (["--require", "heldout_nll:nll_per_token=>3"], "--require 'heldout_nll:nll_per_token=>3': "
                                                    "expected 'TASK:METRIC>=VALUE'"),
    (["--require", "no_such_task:acc>=0.5"], "--require 'no_such_task:acc>=0.5': this run has no "
                                             "benchmark 'no_such_task'; its benchmarks: "
                                             "heldout_generate, heldout_nll"),
])
def test_bad_gates_are_named_before_training(runs, tmp_path, args, message):
    out = tmp_path / "bad"
    r = run_cli(["train", "--model", str(runs["base"]), "--data", str(runs["data"]),
                 "--heldout", str(runs["held"]), "--max-steps", "2", "--output-dir", str(out),
                 *args], env=cli_env(tmp_path))
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("change, message", [
    ({"require": ["t:acc>=abc"]}, "--require 't:acc>=abc': 'abc' is not a finite number"),
    ({"select_best": "heldout_nll"}, "--select-best 'heldout_nll': expected TASK:METRIC"),
    ({"select_best": SELECT}, "--select-best heldout_nll:nll_per_token: chooses among the models "
                              "benchmarked during training; give --benchmark-every N"),
    ({"require": ["t:acc<3"], "enabled": False}, "--require: need the benchmarks that --no-eval "
                                                 "turns off"),
    ({"benchmark_every": 3, "save_every": 2}, "--benchmark-every 3 benchmarks the periodic "
                                              "checkpoints: it must be a multiple of --save-every"),
    ({"benchmark_every": 2, "strategy": "fsdp"}, "--benchmark-every with --strategy fsdp is not "
                                                 "supported (the weights are sharded"),
])
def test_bad_steering_combinations(change, message):
    from sftctl.errors import ConfigError
    from sftctl.run.config import RunConfig

    cfg = RunConfig()
    for k, v in change.items():
        if k == "save_every":
            cfg.train.save_every = v
        elif k == "strategy":
            cfg.train.strategy = v
        else:
            setattr(cfg.eval, k, v)
    with pytest.raises(ConfigError) as e:
        steering.configure(cfg, pm=None)
    assert message in str(e.value)


def test_benchmark_every_sets_save_every():
    from sftctl.run.config import RunConfig

    cfg = RunConfig()
    cfg.eval.benchmark_every = 4
    steering.configure(cfg, pm=None)
    assert cfg.train.save_every == 4
    cfg.train.save_every, cfg.eval.benchmark_every = 2, 6  # a multiple of it: kept
    steering.configure(cfg, pm=None)
    assert cfg.train.save_every == 2


def test_gate_syntax():
    g = steering.parse_gate("alpaca_exact_match:exact_match,strict-match:delta >= 0.05")
    assert (g.task, g.metric, g.kind, g.op, g.value) == (
        "alpaca_exact_match", "exact_match,strict-match", "delta", ">=", 0.05)
    assert g.passes(0.05) and not g.passes(0.0499)
    g = steering.parse_gate("t:acc<0.5")
    assert (g.kind, g.op) == ("sft", "<") and g.passes(0.4) and not g.passes(0.5)
    assert steering.metric_value({"acc,none": 1.0}, "acc") == ("acc,none", 1.0)
    assert steering.metric_value({"acc,a": 1.0, "acc,b": 2.0}, "acc") == (None, None)
    pts = [{"step": s, "model": "checkpoint", "scores": {"t": {"acc": v}},
            "higher_is_better": {"t": {"acc": True}}} for s, v in ((2, 0.5), (4, 0.7), (6, 0.7))]
    assert steering.best_point(pts, steering.Target("t", "acc"))["step"] == 6  # tie: later


def test_rng_is_restored():
    import random

    import numpy as np
    import torch

    before = (random.random(), np.random.rand(), torch.rand(1))
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with steering.rng_preserved():
        random.random(), np.random.rand(3), torch.rand(5)
    after = (random.random(), np.random.rand(), torch.rand(1))
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    assert after == (random.random(), np.random.rand(), torch.rand(1)) and before != after


def test_report_schema_accepts_real_reports_and_rejects_broken_ones(runs):
    jsonschema.Draft202012Validator.check_schema(_schema())
    report = json.loads((runs["steered"] / "report.json").read_text())
    _validate(report)
    # the plain run has no report (--no-eval); `sftctl report` builds one from its files
    r = run_cli(["report", str(runs["plain"]), "--quiet"], env=cli_env(runs["tmp"]))
    assert r.returncode == 0, r.stderr
    plain = json.loads((runs["plain"] / "report.json").read_text())
    assert plain["benchmarks"] is None and plain["steering"] is None
    _validate(plain)

    def broken(change):
        bad = copy.deepcopy(report)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)

    broken(lambda r: r.pop("benchmarks"))                                   # required key
    broken(lambda r: r.update(schema_version=2))                            # another schema
    broken(lambda r: r.update(surprise=1))                                  # unknown key
    broken(lambda r: r["benchmarks"]["table"][0].update(sft="0.9"))         # a string score
    broken(lambda r: r["benchmarks"]["table"][0].pop("delta"))
    broken(lambda r: r["benchmarks"]["table"][0]["status"].update(sft="fine"))
    broken(lambda r: r["training"]["train"][0].update(step=-1))
    broken(lambda r: r["steering"]["points"][0].update(model="best"))
    broken(lambda r: r["steering"]["gates"][0].update(op="=="))
    broken(lambda r: r["steering"]["selected"].pop("step"))
    broken(lambda r: r["plots"].update(loss="/etc/passwd"))
    broken(lambda r: r.update(generated_at="yesterday"))
