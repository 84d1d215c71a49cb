"""docs/plugins.md runs: the code blocks headed ``# sftctl_qa.py`` form a plugin module that is
installed through a real entry point and used for a short training run, a subcommand and the
report hook."""

from __future__ import annotations

import json
import re

import pytest

from sftctl.run import cli
from sftctl.run.plugin_manager import ENV_DISABLE_AUTOLOAD, ENV_PLUGINS, get_plugin_manager

from sftctl_testutil import REPO, build_tiny_base, write_jsonl

DOC = REPO / "docs" / "plugins.md"


def plugin_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    parts = [b for b in blocks if b.startswith("# sftctl_qa.py\n")]
    assert len(parts) >= 12
    return "\n\n".join(parts)


@pytest.fixture
def qa_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "sftctl_qa-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sftctl_qa\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sftctl]\nqa = sftctl_qa\n")
    (site / "sftctl_qa.py").write_text(plugin_source())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    monkeypatch.delenv(ENV_PLUGINS, raising=False)
    return site


def test_every_hook_is_documented_with_an_example():
    text = DOC.read_text()
    src = plugin_source()
    for name in get_plugin_manager(entry_points=False).hook_names():
        assert f"### `{name}(" in text, name  # a section
        assert f"def {name}(" in src, name  # an implementation in the runnable plugin


def test_the_documented_plugin_trains(qa_plugin, tmp_path, capsys):
    base = build_tiny_base(tmp_path / "base")
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "What is 2 squared?",
                                                        "answer": "4"}])
    out = tmp_path / "run"
    rc = cli.main(["train", "--plugin", "qa", "--model", str(base), "--data", "qa-squares://40",
                   "--val-data", "qa-squares://8", "--output-dir", str(out), "--max-steps", "6",
                   "--batch-size", "4", "--optimizer", "sgd_nesterov", "--lr", "0.05",
                   "--scheduler", "step_decay", "--qa-decay-every", "2", "--eval-every", "2",
                   "--qa-heldout", str(heldout), "--qa-freeze-embeddings", "--no-eval",
                   "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # sftctl_prepare_model froze the (tied) embeddings: they never trained
    emb = summary["parameters"]["total"] - summary["parameters"]["trainable"]
    conf = json.loads((base / "config.json").read_text())
    assert emb == conf["vocab_size"] * conf["hidden_size"], summary["parameters"]
    from safetensors.torch import load_file

    trained = load_file(out / "model" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    assert (trained["model.embed_tokens.weight"] == base_w["model.embed_tokens.weight"]).all()
    # sftctl_save_model changed the saved model's config
    assert json.loads((out / "model" / "config.json").read_text())["qa_trained_steps"] == 6
    assert summary["data"]["format"] == "qa" and summary["examples"]["used"] == 40
    assert summary["qa_best_val_loss"] <= summary["initial_val_loss"]
    assert [b["name"] for b in summary["benchmarks"]] == ["qa_exact"]
    assert (out / "eval" / "qa" / "qa_exact.yaml").is_file()
    assert (out / "model" / "QA_CARD.md").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if x["kind"] == "train"]
    assert lrs == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    assert all("qa_best_val_loss" in x for x in lines if x["kind"] == "val")

    import sftctl_qa

    section = sftctl_qa.sftctl_report_sections(out, {})
    assert section["title"] == "QA model card" and "Trained 6 steps" in section["markdown"]
    # the post-training hook (not run here: --no-eval) checks the card the save hook wrote
    options = get_plugin_manager(["qa"]).config_options()
    cfg = cli.C.build_config([("test", {"options": {"qa.heldout": str(heldout)}})], options)
    assert sftctl_qa.sftctl_post_train(out, cfg) == 0
    assert sftctl_qa.sftctl_post_train(tmp_path, cfg) == 1  # no model card there

    # sftctl_config_defaults: the plugin's defaults for its embedded demo; flags still win
    pm = get_plugin_manager(["qa"])
    layers = cli.C.run_layers({"plugins": ["qa"]}, {}, "none", pm)
    cfg = cli.C.build_config(layers, pm.config_options())
    assert (cfg.optim.lr, cfg.optim.name, cfg.train.max_steps) == (0.05, "sgd_nesterov", 300)
    layers = cli.C.run_layers({"plugins": ["qa"], "optim": {"lr": 0.1}}, {}, "none", pm)
    assert cli.C.build_config(layers, pm.config_options()).optim.lr == 0.1
    layers = cli.C.run_layers({"plugins": ["qa"], "model": {"name_or_path": str(base)}}, {},
                              "none", pm)
    assert cli.C.build_config(layers, pm.config_options()).train.max_steps is None

    # the option check of sftctl_configure
    rc = cli.main(["train", "--plugin", "qa", "--qa-decay-every", "0", "--output-dir",
                   str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "options.qa.decay_every" in capsys.readouterr().err


def test_documented_subcommand(qa_plugin, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 3)
    monkeypatch.setenv(ENV_PLUGINS, "qa")
    assert cli.main(["qa-stats", str(data)]) == 0
    assert "3 records" in capsys.readouterr().out


def test_documented_early_stopping(qa_plugin, tmp_path):
    base = build_tiny_base(tmp_path / "base")
    out = tmp_path / "run"
    # lr 0 never improves the validation loss: patience 1 stops at the second validation
    rc = cli.main(["train", "--plugin", "qa", "--model", str(base), "--data", "qa-squares://40",
                   "--val-data", "qa-squares://8", "--output-dir", str(out), "--max-steps", "10",
                   "--batch-size", "4", "--lr", "0", "--eval-every", "2", "--qa-patience", "1",
                   "--no-eval", "--quiet", "--no-initial-eval"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and "no improvement" in s["stopped_early"]
