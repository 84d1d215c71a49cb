"""Trackers (--report-to tensorboard,wandb,mlflow) and the model card, through real CLI runs on a
tiny model; each tracker's output is read back with its own library: TensorBoard's
EventAccumulator, W&B's offline transaction log parsed with W&B's protobuf records, MLflow's
client on the file store."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftctl_testutil import build_tiny_base, cli_env, read_metrics, run_cli  # noqa: E402
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One run with every tracker and the post-training evaluation (alpaca demo tasks)."""
    tmp = tmp_path_factory.mktemp("trackers")
    base = build_tiny_base(tmp / "base")
    out = tmp / "run"
    args = ["train", "--plugin", "alpaca", "--model", str(base), "--output-dir", str(out),
            "--alpaca-demo-train-size", "32", "--alpaca-demo-heldout-size", "8",
            "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--eval-every", "2",
            "--eval-limit", "4", "--report-to", "tensorboard,wandb", "mlflow"]
    env = cli_env(tmp, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    r = run_cli(args, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def _expected(out: Path):
    lines = read_metrics(out)
    train = {m["step"]: m for m in lines if m["kind"] == "train"}
    val = {m["step"]: m for m in lines if m["kind"] == "val"}
    return train, val


def test_post_train_order_evals_first():
    """pluggy calls tryfirst, plain, then trylast implementations (each last-registered
    first): the trackers and the model card read the report that evals writes."""
    from sftctl.run.plugin_manager import get_plugin_manager

    pm = get_plugin_manager(entry_points=False)
    order = [i.plugin_name for i in reversed(pm.hook.sftctl_post_train.get_hookimpls())]
    assert order[0] == "evals"
    for name in ("tensorboard", "wandb", "mlflow", "model_card"):
        assert order.index(name) > order.index("evals")


def test_report_to_unknown_and_missing_package(tmp_path):
    from sftctl import ConfigError, TrackerSpec, hookimpl
    from sftctl.run.config import build_config
    from sftctl.run.plugin_manager import get_plugin_manager
    from sftctl.training.trackers import check_report_to, selected_trackers

    class ThirdParty:
        @hookimpl
        def sftctl_register_trackers(self, register):
            register(TrackerSpec("neptunish", requires=("sftctl_no_such_module_xyz",),
                                 install="neptunish-client"))
            register(TrackerSpec("builtinlike", requires=("sftctl_no_such_module_xyz",),
                                 extra="trackers"))

    pm = get_plugin_manager(entry_points=False, extra=[("thirdparty", ThirdParty())])
    trackers = pm.trackers()
    assert {"tensorboard", "wandb", "mlflow", "neptunish"} <= set(trackers)

    def cfg(*names):
        return build_config([("t", {"train": {"report_to": list(names),
                                              "output_dir": str(tmp_path)}})])

    assert selected_trackers(cfg("tensorboard,wandb", "none", "wandb")) == ["tensorboard",
                                                                            "wandb"]
    assert [s.name for s in check_report_to(cfg("tensorboard,mlflow"), trackers)] == \
        ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'; known trackers: .*"
                                          r"mlflow.*tensorboard.*wandb"):
        check_report_to(cfg("tensorbord"), trackers)
    with pytest.raises(ConfigError, match=r'pip install "sftctl\[trackers\]"'):
        check_report_to(cfg("builtinlike"), trackers)
    with pytest.raises(ConfigError, match="pip install neptunish-client"):
        check_report_to(cfg("neptunish"), trackers)


def test_report_to_unknown_cli(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    r = run_cli(["train", "--plugin", "alpaca", "--model", str(base), "--output-dir",
                 str(tmp_path / "o"), "--alpaca-demo-train-size", "16", "--max-steps", "1",
                 "--report-to", "tensorboard,tensrboard"], env=cli_env(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unknown tracker 'tensrboard'; known trackers: mlflow, tensorboard, wandb" in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before training


def test_tensorboard_event_files(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tracked_run
    train, val = _expected(out)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for key, name in (("loss", "train/loss"), ("lr", "train/lr"),
                      ("grad_norm", "train/grad_norm"), ("tokens_per_s", "train/tokens_per_s")):
        got = {e.step: e.value for e in ea.Scalars(name)}
        assert sorted(got) == sorted(train)
        for step, m in train.items():
            assert got[step] == pytest.approx(m[key], rel=1e-6)
    got = {e.step: e.value for e in ea.Scalars("val/loss")}
    assert got == pytest.approx({s: m["val_loss"] for s, m in val.items()}, rel=1e-6)
    assert "val/ppl" in scalars and "summary/final_loss" in scalars
    report = json.loads((out / "report.json").read_text())
    rows = report["benchmarks"]["table"]
    for r in rows:
        tag = f"benchmark/{r['task']}/{r['metric']}/sft"
        assert tag in scalars
        assert ea.Scalars(tag)[-1].value == pytest.approx(r["sft"], rel=1e-6)
    tensors = ea.Tags()["tensors"]
    assert "benchmarks/text_summary" in tensors and "config/text_summary" in tensors
    text = ea.Tensors("benchmarks/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| task | metric | base | sft |" in text
    assert rows[0]["task"] in text


def _wandb_records(path: str):
    """Records of a W&B transaction log (.wandb: LevelDB log blocks with W&B's header), each
    parsed with W&B's own protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        else:
            payload = buf + chunk
        rec = pb.Record()
        rec.ParseFromString(payload)
        out.append(rec)
    return out


def test_wandb_offline_run(tracked_run):
    out, _ = tracked_run
    train, val = _expected(out)
    (path,) = glob.glob(str(out / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    records = _wandb_records(path)
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["optim.lr"] == 5e-3 and config["train.max_steps"] == 4
    losses = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert losses == pytest.approx({s: m["loss"] for s, m in train.items()}, rel=1e-9)
    vals = {h["_step"]: h["val/loss"] for h in history if "val/loss" in h}
    assert vals == pytest.approx({s: m["val_loss"] for s, m in val.items()}, rel=1e-9)
    assert any("train/grad_norm" in h and "train/lr" in h and "train/tokens_per_s" in h
               for h in history)
    (table,) = [h for h in history if "benchmarks/_type" in h]
    assert table["benchmarks/_type"] == "table-file"
    tfile = Path(path).parent / "files" / table["benchmarks/path"]
    logged = json.loads(tfile.read_text())
    rows = json.loads((out / "report.json").read_text())["benchmarks"]["table"]
    assert logged["columns"] == ["task", "metric", "base", "sft", "delta"]
    assert [[r["task"], r["metric"]] for r in rows] == [d[:2] for d in logged["data"]]
    assert [d[3] for d in logged["data"]] == pytest.approx([r["sft"] for r in rows])
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished


def test_mlflow_file_store(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in

    out, _ = tracked_run
    train, val = _expected(out)
    state = json.loads((out / "trackers" / "mlflow.json").read_text())
    assert state["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.005"
    hist = {m.step: m.value for m in client.get_metric_history(state["run_id"], "train/loss")}
    assert hist == pytest.approx({s: m["loss"] for s, m in train.items()}, rel=1e-9)
    hist = {m.step: m.value for m in client.get_metric_history(state["run_id"], "val/loss")}
    assert hist == pytest.approx({s: m["val_loss"] for s, m in val.items()}, rel=1e-9)
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(client.get_metric_history(state["run_id"], key)) == len(train)
    arts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"benchmarks.json", "benchmarks.md"} <= arts
    local = client.download_artifacts(state["run_id"], "benchmarks.json", str(out / "dl"))
    table = json.loads(Path(local).read_text())
    rows = json.loads((out / "report.json").read_text())["benchmarks"]["table"]
    sft = dict(zip(table["columns"], zip(*table["data"])))["sft"]
    assert list(sft) == pytest.approx([r["sft"] for r in rows])


def test_model_card_after_post_train(tracked_run):
    from huggingface_hub import ModelCard

    out, _ = tracked_run
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "transformers"
    assert "sftctl" in card.data.tags and card.data.base_model is None  # a local base
    report = json.loads((out / "report.json").read_text())
    text = card.text
    assert "## Evaluation: base vs SFT" in text and "No benchmark results yet" not in text
    for r in report["benchmarks"]["table"]:
        assert f"| {r['task']} | {r['metric']} | {r['base']:.4g} | {r['sft']:.4g} |" in text
    assert "![Training and validation loss](loss_curve.png)" in text
    assert (out / "model" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train, _ = _expected(out)
    assert f"| 4 | {train[4]['loss']:.4g} |" in text
    assert not list((out / "model").glob(".*"))  # no temporary left
