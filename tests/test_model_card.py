"""The model card of a run without the post-training evaluation, and --push-to-hub up to the
upload call: the preflight errors (offline mode, no token, the Hub unreachable) raised before
training, and the list of files an upload would send (`sftctl push-to-hub --dry-run`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftctl_testutil import alpaca_records, build_tiny_base, cli_env, run_cli, write_jsonl  # noqa: E402
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    return (tmp, build_tiny_base(tmp / "base"), write_jsonl(tmp / "train.jsonl",
                                                            alpaca_records(24)))


def _args(base, train, out, *extra):
    return ["train", "--model", str(base), "--data", str(train), "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "4", *extra]


def test_card_without_eval_and_upload_list(data):
    from huggingface_hub import ModelCard

    tmp, base, train = data
    out = tmp / "noeval"
    r = run_cli(_args(base, train, out, "--no-eval"), env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-2000:]
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == \
        "text-generation"
    text = card.text
    assert "No benchmarks were run: the training run had `--no-eval`" in text
    assert "| base |" not in text  # no table that would claim results
    assert "train: `" in text and "24 examples used of 24 records" in text
    assert "| learning rate | 2e-05 |" in text and "| optimizer steps | 3 |" in text
    r = run_cli(["push-to-hub", str(out), "me/model", "--dry-run"], env=cli_env(tmp))
    assert r.returncode == 0, r.stderr
    listed = dict(line.split("\t") for line in r.stdout.splitlines())
    assert {"README.md", "config.json", "model.safetensors", "loss_curve.png",
            "sftctl_config.yaml", "sftctl_summary.json", "tokenizer.json"} <= set(listed)
    assert all(Path(p).is_file() for p in listed.values())


def test_collect_upload_files_includes_report(tmp_path):
    from sftctl.plugins.model_card.hub import collect_upload_files

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md", ".README.md.tmp-1"):
        (run / "model" / name).write_text("x")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "report_assets").mkdir()
    (run / "report_assets" / "loss.png").write_text("x")
    for name in ("report.json", "report.md", "summary.json"):
        (run / name).write_text("{}")
    got = sorted(p for _, p in collect_upload_files(run))
    assert got == ["README.md", "adapter/adapter_config.json", "config.json",
                   "model.safetensors", "sftctl_report/report.json", "sftctl_report/report.md",
                   "sftctl_report/report_assets/loss.png"]


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "offline mode (HF_HUB_OFFLINE=1)"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, "no Hugging Face token"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token",
      "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached or refuses the token"),
])
def test_push_to_hub_refused_before_training(data, env, message):
    tmp, base, train = data
    out = tmp / f"push{len(message)}"
    e = cli_env(tmp, HF_HOME=str(tmp / "hf_home"), **env)
    if not env.get("HF_TOKEN", "x"):
        e.pop("HF_TOKEN", None)
    r = run_cli(_args(base, train, out, "--push-to-hub", "me/model"), env=e)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.push_to_hub (me/model)" in r.stderr and message in r.stderr
    assert not (out / "model").exists()
