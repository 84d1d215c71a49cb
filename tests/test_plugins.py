"""The plugin system: registration hooks, duplicates, check_pending, entry points and the
environment switches, lifecycle hooks (with a wrapper) in a real training run, the options hook,
historic/firstresult hooks, and the example third-party plugin installed with pip.

Temporary plugins are real: objects registered into a fresh plugin manager, or modules exposed
through a real ``*.dist-info/entry_points.txt`` on ``sys.path``. Installed third-party plugins are
not loaded unless a test asks (``SFTCTL_DISABLE_PLUGIN_AUTOLOAD=1`` by default here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftctl import DatasetFormat, OptimizerSpec, Segment, hookimpl
from sftctl.run import cli
from sftctl.errors import PluginError
from sftctl.run.plugin_manager import ENV_DISABLE_AUTOLOAD, ENV_PLUGINS, get_plugin_manager

from sftctl_testutil import REPO, alpaca_records, build_tiny_base, cli_env, run_cli, write_jsonl


@pytest.fixture(autouse=True)
def no_autoload(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    monkeypatch.delenv(ENV_PLUGINS, raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny"))


def fake_distribution(root: Path, dist: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> Path:
    """A real installed distribution: ``root/<dist>-0.1.dist-info`` + modules in ``root``."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "[sftctl]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    return root


def qa_format(name="qa"):
    return DatasetFormat(name, lambda r: [Segment(r["q"] + "\n", False), Segment(r["a"], True)],
                         fields={"q": "question", "a": "answer"}, required=("q", "a"))


# --------------------------------------------------------------------------- registration


def test_builtins_register_through_the_hooks():
    pm = get_plugin_manager(entry_points=False)
    assert pm.dataset_formats()["alpaca"].plugin == "alpaca"
    assert pm.optimizers()["adamw"].plugin == "optimizers"
    assert pm.schedulers()["cosine"].plugin == "schedulers"
    assert pm.config_options()["alpaca.demo_seed"].plugin == "alpaca"


def test_registered_items_are_stamped_with_their_plugin():
    class QA:
        @hookimpl
        def sftctl_register_dataset_formats(self, register):
            register(qa_format())

    pm = get_plugin_manager(entry_points=False, extra=[("qa_plugin", QA())])
    assert pm.dataset_formats()["qa"].plugin == "qa_plugin"
    assert pm.formats_of("qa_plugin") == ["qa"]


def test_duplicate_registration_names_both_plugins():
    class Dup:
        @hookimpl
        def sftctl_register_dataset_formats(self, register):
            register(qa_format("alpaca"))

    pm = get_plugin_manager(entry_points=False, extra=[("dupper", Dup())])
    with pytest.raises(PluginError) as e:
        pm.dataset_formats()
    assert "'alpaca'" in str(e.value) and "'dupper'" in str(e.value)

    class DupOpt:
        @hookimpl
        def sftctl_register_optimizers(self, register):
            register(OptimizerSpec("sgd", lambda *a: None))

    pm = get_plugin_manager(entry_points=False, extra=[("myopt", DupOpt())])
    with pytest.raises(PluginError, match="optimizer 'sgd' is registered twice: by plugin "
                                          "'optimizers' and by plugin 'myopt'"):
        pm.optimizers()


def test_wrong_registration_type_is_an_error():
    class Bad:
        @hookimpl
        def sftctl_register_optimizers(self, register):
            register("adamw")

    pm = get_plugin_manager(entry_points=False, extra=[("bad", Bad())])
    with pytest.raises(PluginError, match="plugin 'bad'.*expected OptimizerSpec"):
        pm.optimizers()


def test_misspelled_hook_is_caught_by_check_pending():
    class Typo:
        @hookimpl
        def sftctl_stepend(self, trainer):
            pass

    with pytest.raises(PluginError) as e:
        get_plugin_manager(entry_points=False, extra=[("typo", Typo())])
    assert "plugin 'typo' implements unknown hook(s) sftctl_stepend" in str(e.value)
    assert "sftctl_step_end" in str(e.value)  # the valid names are listed


def test_historic_configure_reaches_late_plugins():
    pm = get_plugin_manager(entry_points=False)
    seen = []

    class Late:
        @hookimpl
        def sftctl_configure(self, config):
            seen.append(config)

    pm.hook.sftctl_configure.call_historic(kwargs=dict(config="CFG", pm=pm))
    pm.add_plugin(Late(), "late")
    assert seen == ["CFG"]


# ---------------------------------------------------------------------------- entry points


def test_entry_point_plugins_and_the_environment_switches(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "twoplugs", {"ep_one": "ep_one_mod", "ep_two": "ep_two_mod"}, {
        "ep_one_mod": "from sftctl import hookimpl\n@hookimpl\ndef sftctl_configure(config):\n"
                      "    pass\n",
        "ep_two_mod": "x = 1\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    pm = get_plugin_manager()
    assert {"ep_one", "ep_two"} <= set(pm.infos)
    assert pm.infos["ep_one"].source == "entry point"
    assert pm.infos["ep_one"].distribution == "twoplugs"

    monkeypatch.setenv(ENV_PLUGINS, "ep_two")
    pm = get_plugin_manager()
    assert "ep_two" in pm.infos and "ep_one" not in pm.infos
    assert "ep_one" in pm.skipped_entry_points

    monkeypatch.delenv(ENV_PLUGINS)
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    pm = get_plugin_manager()
    assert "ep_one" not in pm.infos and "ep_two" not in pm.infos
    pm = get_plugin_manager(["ep_one"])  # --plugin loads a named plugin anyway
    assert "ep_one" in pm.infos and "ep_two" not in pm.infos

    monkeypatch.setenv(ENV_PLUGINS, "ep_one,not_installed")
    with pytest.raises(PluginError, match="not_installed"):
        get_plugin_manager()


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "brokenplug", {"broken": "broken_mod_xyz"},
                      {"broken_mod_xyz": "raise ImportError('needs the package foo')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    with pytest.raises(PluginError) as e:
        get_plugin_manager()
    msg = str(e.value)
    assert "plugin 'broken'" in msg and "broken_mod_xyz" in msg and "brokenplug" in msg
    assert "needs the package foo" in msg
    assert cli.main(["plugins"]) == 2  # the CLI reports it as an error, not a traceback
    assert "plugin 'broken'" in capsys.readouterr().err


# ------------------------------------------------------------------- lifecycle in a real run

RECORDER = '''
import json
from pathlib import Path
from sftctl import ConfigOption, DatasetFormat, Segment, hookimpl

EVENTS = []

@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("recorder.tag", str, "none", "a tag written into the checkpoint"))
    register(ConfigOption("recorder.n", int, 3, "records served by mem://"))

@hookimpl
def sftctl_configure(config, pm):
    EVENTS.append(("configure", config.option("recorder.tag")))

@hookimpl
def sftctl_register_dataset_formats(register):
    register(DatasetFormat("qa", lambda r: [Segment("Q: " + r["q"] + "\\nA: ", False),
                                            Segment(r["a"], True)],
                           fields={"q": "question", "a": "answer"}, required=("q", "a")))

@hookimpl
def sftctl_load_dataset(source, config):
    if source.startswith("mem://"):
        return [{"q": "apple basket", "a": "basket apple"}] * config.option("recorder.n")
    return None

@hookimpl
def sftctl_train_start(trainer):
    EVENTS.append(("train_start", trainer.state.step))

@hookimpl
def sftctl_step_end(trainer, step, metrics):
    EVENTS.append(("step_end", step, round(metrics["loss"], 6)))

@hookimpl
def sftctl_evaluate(trainer, step, metrics):
    metrics["recorder"] = True
    EVENTS.append(("evaluate", step))

@hookimpl
def sftctl_save(trainer, path):
    EVENTS.append(("save", Path(path).name.startswith(".model.tmp"),
                   (Path(path) / "model.safetensors").is_file()))
    (Path(path) / "recorder.json").write_text(json.dumps(
        {"tag": trainer.config.option("recorder.tag")}))

@hookimpl
def sftctl_after_train(trainer, summary):
    EVENTS.append(("after_train", summary["steps"]))
    summary["recorder_order"] = len(EVENTS)

@hookimpl(wrapper=True)
def sftctl_after_train(trainer, summary):
    # a wrapper runs around the other implementations (including the one above)
    result = yield
    summary["recorder_wrapper_saw"] = summary.get("recorder_order")
    return result
'''


def test_lifecycle_hooks_options_and_firstresult_in_a_real_run(tmp_path, tiny, monkeypatch):
    # two implementations of one hook in one module are not possible; use two modules
    fake_distribution(tmp_path / "site", "recorderplug",
                      {"recorder": "recorder_mod_abc", "recorder_wrap": "recorder_wrap_abc"}, {
                          "recorder_mod_abc": RECORDER.split("@hookimpl(wrapper=True)")[0],
                          "recorder_wrap_abc": "from sftctl import hookimpl\n"
                                               "@hookimpl(wrapper=True)" +
                                               RECORDER.split("@hookimpl(wrapper=True)")[1]})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "run"
    rc = cli.main(["train", "--plugin", "recorder", "--plugin", "recorder_wrap", "--model",
                   str(tiny), "--data", "mem://x", "--val-data", "mem://y", "--output-dir",
                   str(out), "--max-steps", "3", "--batch-size", "2", "--no-eval", "--quiet",
                   "--eval-every", "2", "--recorder-tag", "hello", "--recorder-n", "5"])
    assert rc == 0
    import recorder_mod_abc as rec

    kinds = [e[0] for e in rec.EVENTS]
    assert kinds == ["configure", "train_start", "evaluate", "step_end", "step_end", "evaluate",
                     "step_end", "evaluate", "save", "after_train"]
    assert rec.EVENTS[0] == ("configure", "hello")
    assert ("save", True, True) in rec.EVENTS  # inside the temporary dir, weights already there
    assert json.loads((out / "model" / "recorder.json").read_text()) == {"tag": "hello"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["format"] == "qa"  # --plugin made its format the default
    assert summary["examples"]["used"] == 5  # served by the firstresult hook
    assert summary["recorder_wrapper_saw"] == summary["recorder_order"] == len(rec.EVENTS)
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(v.get("recorder") for v in vals if v["kind"] == "val")


def test_plugin_options_are_typed(tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "optplug", {"optplug": "optplug_mod_q"}, {"optplug_mod_q": """
        from sftctl import ConfigOption, hookimpl
        @hookimpl
        def sftctl_add_options(register):
            register(ConfigOption("optplug.level", int, 1, "a level", choices=(1, 2, 3)))
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    y = tmp_path / "r.yaml"
    y.write_text("options:\n  optplug.level: two\n")
    assert cli.main(["train", "--plugin", "optplug", "--config", str(y), "--print-config"]) == 2
    assert "options.optplug.level: expected an integer" in capsys.readouterr().err
    y.write_text("options:\n  optplug.level: 5\n")
    assert cli.main(["train", "--plugin", "optplug", "--config", str(y), "--print-config"]) == 2
    assert "not one of 1, 2, 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--plugin", "optplug", "--help"])
    assert "--optplug-level" in capsys.readouterr().out


# --------------------------------------------------------------------- the example plugin


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(REPO / "examples" / "sftctl-sharegpt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


def test_example_plugin_installs_lists_and_trains(example_plugin, tiny, tmp_path):
    env = cli_env(tmp_path, PYTHONPATH=str(example_plugin))
    env.pop(ENV_DISABLE_AUTOLOAD)  # installed plugins load like in a user's environment
    r = run_cli(["plugins", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    info = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert info["sharegpt"]["source"] == "entry point"
    assert info["sharegpt"]["distribution"] == "sftctl-sharegpt"
    assert info["sharegpt"]["dataset_formats"] == ["sharegpt"]

    chats = [{"conversations": [{"from": "human", "value": r["instruction"] + "\n" + r["input"]},
                                {"from": "gpt", "value": r["output"]}]}
             for r in alpaca_records(12)]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    out = tmp_path / "run"
    r = run_cli(["train", "--plugin", "sharegpt", "--model", str(tiny), "--data", str(data),
                 "--output-dir", str(out), "--max-steps", "3", "--no-eval", "--quiet",
                 "--sharegpt-system", "Answer exactly."], env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["format"] == "sharegpt" and s["data"]["format_plugin"] == "sharegpt"
    assert s["examples"]["used"] == 12

    bad = write_jsonl(tmp_path / "bad.jsonl", chats[:2] + [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]}])
    r = run_cli(["train", "--plugin", "sharegpt", "--model", str(tiny), "--data", str(bad),
                 "--output-dir", str(tmp_path / "bad"), "--quiet"], env=env)
    assert r.returncode == 2
    assert "record 2 (line 3): field 'conversations[1].value': expected a string" in r.stderr

    # restricted by the environment: the plugin is installed but not loaded, and named as such
    env[ENV_PLUGINS] = ""
    r = run_cli(["train", "--plugin", "nosuch", "--print-config"], env=env)
    assert r.returncode == 2 and "available:" in r.stderr and "sharegpt" in r.stderr
