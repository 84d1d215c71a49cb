"""The plugin system: registration hooks, duplicates, check_pending, entry points and the
environment switches, lifecycle hooks (with a wrapper) in a real training run, the options hook,
historic/firstresult hooks, and the example third-party plugin installed with pip; plugins that
fail (a broken import, a hook or a format raising) through the real CLI: the message, the exit
code and the traceback behind ``--debug``.

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

from sftctl import ConfigError, DatasetFormat, OptimizerSpec, SchedulerSpec, Segment, hookimpl
from sftctl.run import cli
from sftctl.errors import PluginError, PluginHookError
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


def test_model_load_options_merge_and_refuse_what_sftctl_owns():
    """sftctl_model_load_options: each key from one plugin; a key set twice names both plugins,
    a key sftctl owns (device_map, trust_remote_code, ...) or a non-dict is refused, naming the
    plugin; with no plugin asking, nothing is passed."""
    import torch

    def plugin(out):
        class P:
            @hookimpl
            def sftctl_model_load_options(self, config, device):
                return out
        return P()

    from sftctl.run.config import build_config

    cpu = torch.device("cpu")
    pm = get_plugin_manager(entry_points=False)
    cfg = build_config([("t", {"train": {"output_dir": "unused"}})], pm.config_options())
    assert pm.model_load_options(cfg, cpu) == ({}, {})
    pm = get_plugin_manager(entry_points=False, extra=[("half", plugin({"dtype": torch.bfloat16})),
                                                       ("quiet", plugin(None))])
    assert pm.model_load_options(cfg, cpu) == ({"dtype": torch.bfloat16}, {"dtype": "half"})
    pm = get_plugin_manager(entry_points=False, extra=[("one", plugin({"dtype": torch.float16})),
                                                       ("two", plugin({"dtype": torch.bfloat16}))])
    with pytest.raises(PluginError, match="'dtype' is set by plugin 'one' and by plugin 'two'"):
        pm.model_load_options(cfg, cpu)
    pm = get_plugin_manager(entry_points=False, extra=[("greedy", plugin({"device_map": "auto"}))])
    with pytest.raises(PluginError, match="plugin 'greedy'.*set 'device_map'; plugins may set "
                                          "only dtype, quantization_config"):
        pm.model_load_options(cfg, cpu)
    pm = get_plugin_manager(entry_points=False, extra=[("odd", plugin(["dtype"]))])
    with pytest.raises(PluginError, match="plugin 'odd'.*returned list"):
        pm.model_load_options(cfg, cpu)


def test_config_defaults_from_two_plugins_on_one_key_name_both():
    def plugin(layer):
        class P:
            @hookimpl
            def sftctl_config_defaults(self, plugins, data_format, embedded):
                return layer
        return P()

    pm = get_plugin_manager(entry_points=False, extra=[("fast", plugin({"optim": {"lr": 1.0}})),
                                                       ("slow", plugin({"optim": {"lr": 0.1}}))])
    with pytest.raises(PluginError, match="optim.lr is set by the defaults of plugin 'fast' "
                                          "and of plugin 'slow'"):
        pm.config_defaults(["fast", "slow"], "alpaca", True)
    pm = get_plugin_manager(entry_points=False, extra=[("fast", plugin({"optim": {"lr": 1.0}})),
                                                       ("odd", plugin("lr=1"))])
    with pytest.raises(PluginError, match="plugin 'odd': sftctl_config_defaults returned str"):
        pm.config_defaults(["fast", "odd"], "alpaca", True)
    pm = get_plugin_manager(entry_points=False, extra=[("fast", plugin({"optim": {"lr": 1.0}}))])
    assert ("defaults of plugin 'fast'", {"optim": {"lr": 1.0}}) in \
        pm.config_defaults(["fast"], "alpaca", True)


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

    from sftctl.run.config import build_config

    cfg = build_config([("t", {})], pm.config_options())  # built-ins read a real config
    pm.hook.sftctl_configure.call_historic(kwargs=dict(config=cfg, pm=pm))
    pm.add_plugin(Late(), "late")
    assert len(seen) == 1 and seen[0] is cfg


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


def test_a_broken_plugin_is_listed_and_stops_only_real_work(tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "brokenplug", {"broken": "broken_mod_xyz", "fine": "fine_mod_xyz"},
                      {"broken_mod_xyz": "raise ImportError('needs the package foo')\n",
                       "fine_mod_xyz": "x = 1\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    with pytest.raises(PluginError) as e:  # the library default: strict
        get_plugin_manager()
    msg = str(e.value)
    assert "plugin 'broken' failed to import" in msg and "broken_mod_xyz" in msg
    assert "brokenplug 0.1" in msg and "ImportError: needs the package foo" in msg
    assert ENV_PLUGINS in msg and ENV_DISABLE_AUTOLOAD in msg
    pm = get_plugin_manager(strict=False)
    assert "fine" in pm.infos and "broken" not in pm.infos and set(pm.broken) == {"broken"}

    # the diagnostic commands work and name it
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken  BROKEN: failed to import" in out and "needs the package foo" in out
    assert ENV_PLUGINS in out and ENV_DISABLE_AUTOLOAD in out and "fine  (entry point" in out
    assert cli.main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in payload["broken"]] == ["broken"]
    assert payload["broken"][0]["error"] == "ImportError: needs the package foo"
    assert cli.main(["doctor"]) == 1  # a health check: something is wrong
    assert "broken  BROKEN: failed to import" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ex:
        cli.main(["--help"])
    assert ex.value.code == 0
    assert "plugin 'broken' failed to import" in capsys.readouterr().err

    # real work stops, with the ways out; the traceback is one flag away
    assert cli.main(["train", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sftctl: error: plugin 'broken' failed")
    assert f"{ENV_PLUGINS}=a,b" in err and f"{ENV_DISABLE_AUTOLOAD}=1" in err
    assert "--debug" in err and "Traceback" not in err
    assert cli.main(["--debug", "train", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "broken_mod_xyz.py" in err
    assert err.rstrip().splitlines()[-1].startswith("sftctl: error: plugin 'broken'")
    assert cli.main(["train", "--plugin", "broken", "--print-config"]) == 2
    assert "plugin 'broken' failed to import" in capsys.readouterr().err

    # a way out named in the message works
    monkeypatch.setenv(ENV_PLUGINS, "fine")
    assert cli.main(["train", "--print-config"]) == 0
    capsys.readouterr()


def test_a_plugin_refused_at_registration_is_broken_not_fatal(tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "typoplug", {"typo": "typo_mod_xyz"}, {"typo_mod_xyz": """
        from sftctl import hookimpl
        @hookimpl
        def sftctl_stepend(run):
            pass
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "typo  BROKEN: implements unknown hook(s) sftctl_stepend" in out
    assert "sftctl_step_end" in out  # the valid names
    assert cli.main(["train", "--print-config"]) == 2
    assert "plugin 'typo' implements unknown hook(s) sftctl_stepend (entry point typo_mod_xyz" \
        in capsys.readouterr().err


# ------------------------------------------------------------------ failing hook implementations


def test_hook_exceptions_name_plugin_and_hook_through_wrappers():
    class Boom:
        @hookimpl
        def sftctl_step_end(self, run, step, metrics):
            raise KeyError("loss_ema")

        @hookimpl
        def sftctl_load_dataset(self, source):
            raise OSError("bucket not reachable")

        @hookimpl
        def sftctl_configure(self, config):
            if config == "reject":
                from sftctl import ConfigError
                raise ConfigError("options.boom.x: must be positive")
            raise ValueError("late failure")

    class Around:  # a new-style wrapper around the failing implementation
        seen: list = []

        @hookimpl(wrapper=True)
        def sftctl_step_end(self, step):
            try:
                return (yield)
            except KeyError as e:
                self.seen.append(e)
                raise

    class OldAround:  # an old-style hookwrapper sees the failure as its outcome
        @hookimpl(hookwrapper=True)
        def sftctl_step_end(self):
            outcome = yield
            Around.seen.append(outcome.exception)

    pm = get_plugin_manager(entry_points=False, extra=[("boom", Boom()), ("around", Around()),
                                                       ("old_around", OldAround())])
    pm.unregister(name="metrics_jsonl")  # a built-in lifecycle plugin; these calls pass no run
    with pytest.raises(PluginHookError) as e:
        pm.hook.sftctl_step_end(run=None, step=3, metrics={})
    err = e.value
    assert (err.plugin, err.hook, type(err.error)) == ("boom", "sftctl_step_end", KeyError)
    assert err.__cause__ is err.error and err.exit_code == 1  # training had started
    assert "plugin 'boom' failed in sftctl_step_end: KeyError: 'loss_ema'" in str(err)
    # the wrappers received the plugin's own exception, and passing it on did not make it theirs
    assert [type(x) for x in Around.seen] == [KeyError, KeyError]

    with pytest.raises(PluginHookError, match="plugin 'boom' failed in sftctl_load_dataset: "
                                              "OSError: bucket not reachable") as e:
        pm.hook.sftctl_load_dataset(source="s3://x", config=None)  # firstresult
    assert e.value.exit_code == 2

    # a ConfigError raised on purpose keeps its type and message, and is stamped
    with pytest.raises(ConfigError) as e:
        pm.hook.sftctl_configure.call_historic(kwargs=dict(config="reject", pm=pm))
    assert str(e.value) == "options.boom.x: must be positive"
    assert (e.value.plugin, e.value.hook, e.value.exit_code) == ("boom", "sftctl_configure", 2)

    # historic: the replay to a plugin registered later is guarded too
    pm = get_plugin_manager(entry_points=False)
    from sftctl.run.config import build_config

    cfg = build_config([("t", {})], pm.config_options())  # the built-ins read a real config
    pm.hook.sftctl_configure.call_historic(kwargs=dict(config=cfg, pm=pm))
    with pytest.raises(PluginHookError, match="plugin 'late' failed in sftctl_configure: "
                                              "ValueError: late failure"):
        pm.add_plugin(Boom(), "late")
    assert not pm.has_plugin("late")


def test_a_wrapper_failing_after_yield_is_named():
    class Fine:
        @hookimpl
        def sftctl_step_end(self, step):
            return step

    class BadWrap:
        @hookimpl(wrapper=True)
        def sftctl_step_end(self):
            result = yield
            raise RuntimeError(f"saw {result}")

    class NoYield:
        @hookimpl(wrapper=True)
        def sftctl_evaluate(self):
            if False:
                yield

    pm = get_plugin_manager(entry_points=False, extra=[("fine", Fine()), ("badwrap", BadWrap()),
                                                       ("noyield", NoYield())])
    pm.unregister(name="metrics_jsonl")  # a built-in lifecycle plugin; these calls pass no run
    with pytest.raises(PluginHookError, match=r"plugin 'badwrap' failed in sftctl_step_end: "
                                              r"RuntimeError: saw \[7\]"):
        pm.hook.sftctl_step_end(run=None, step=7, metrics={})
    with pytest.raises(PluginHookError, match="plugin 'noyield' failed in sftctl_evaluate: "
                                              "RuntimeError: the wrapper returned without"):
        pm.hook.sftctl_evaluate(run=None, step=1, metrics={})


CRASHY = '''
import os
from sftctl import ConfigError, DatasetFormat, Segment, hookimpl

def crash(hook):
    if os.environ.get("CRASHY_AT") == hook:
        raise RuntimeError(f"crashy bug in {hook}")

@hookimpl
def sftctl_add_options(register):
    crash("sftctl_add_options")

@hookimpl
def sftctl_register_dataset_formats(register):
    crash("sftctl_register_dataset_formats")
    register(DatasetFormat("crashy", lambda r: [Segment("Q: " + r["q"] + "\\nA: ", False),
                                                Segment(r["a"], True)],
                           fields={"q": "question", "a": "answer"}, required=("q", "a")))

@hookimpl
def sftctl_add_commands(subparsers):
    crash("sftctl_add_commands")
    p = subparsers.add_parser("crashy-cmd")
    p.set_defaults(func=lambda args: crash("command"))

@hookimpl
def sftctl_configure(config):
    crash("sftctl_configure")
    if os.environ.get("CRASHY_AT") == "reject":
        raise ConfigError("options.crashy: rejected on purpose")

@hookimpl
def sftctl_load_dataset(source):
    crash("sftctl_load_dataset")
    return [{"q": "apple basket", "a": "basket apple"}] * 4 if source == "mem://" else None

@hookimpl
def sftctl_train_start(run):
    crash("sftctl_train_start")

@hookimpl
def sftctl_step_end(run, step):
    crash("sftctl_step_end")

@hookimpl
def sftctl_save(run, path):
    crash("sftctl_save")
'''


@pytest.fixture
def crashy(tmp_path, monkeypatch):
    fake_distribution(tmp_path / "site", "crashyplug", {"crashy": "crashy_mod_q"},
                      {"crashy_mod_q": CRASHY})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv(ENV_PLUGINS, "crashy")  # loaded for every command


@pytest.mark.parametrize("hook, argv, code", [
    ("sftctl_add_options", ["plugins"], 2),
    ("sftctl_register_dataset_formats", ["train", "--print-config"], 2),
    ("sftctl_add_commands", ["doctor"], 2),
    ("command", ["crashy-cmd"], 1),
])
def test_failing_hooks_before_any_work(crashy, monkeypatch, capsys, hook, argv, code):
    monkeypatch.setenv("CRASHY_AT", hook)
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    name = "command 'crashy-cmd'" if hook == "command" else hook
    assert err.count("\n") == 1, err  # one message, no traceback
    assert f"sftctl: error: plugin 'crashy' failed in {name}: RuntimeError: crashy bug in " \
           f"{hook} (sftctl --debug prints the traceback)" in err
    assert cli.main(["--debug"] + argv) == code  # --debug anywhere
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "crashy_mod_q.py" in err
    assert "The above exception was the direct cause" in err  # the plugin's own frames first


@pytest.mark.parametrize("hook, code", [("sftctl_configure", 2), ("sftctl_load_dataset", 2),
                                        ("sftctl_train_start", 2), ("sftctl_step_end", 1),
                                        ("sftctl_save", 1), ("reject", 2)])
def test_failing_hooks_in_a_run(crashy, tiny, tmp_path, monkeypatch, capsys, hook, code):
    monkeypatch.setenv("CRASHY_AT", hook)
    argv = ["train", "--plugin", "crashy", "--model", str(tiny), "--data", "mem://",
            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
            "--no-eval", "--quiet", "--no-initial-eval"]
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    if hook == "reject":  # raised on purpose: the plugin's message, then whose it is
        assert err == ("sftctl: error: options.crashy: rejected on purpose [raised by plugin "
                       "'crashy' in sftctl_configure]")
    else:
        assert err.splitlines()[-1] == (
            f"sftctl: error: plugin 'crashy' failed in {hook}: RuntimeError: crashy bug in "
            f"{hook} (sftctl --debug prints the traceback)")
    assert "Traceback" not in err


# --------------------------------------------------------------- a format's to_segments crashing

BUGGY_FORMAT = '''
from sftctl import DatasetFormat, RecordError, Segment, hookimpl

def to_segments(record):
    if record["q"] == "bad":
        raise RecordError("q", "is bad")
    topic, question = record["q"].split("|")  # the bug: assumes every question has a topic
    return [Segment(f"[{topic}] Q: {question}\\nA: ", False), Segment(record["answer"], True)]

@hookimpl
def sftctl_register_dataset_formats(register):
    register(DatasetFormat("buggy", to_segments, fields={"q": "question"}, required=("q",)))
'''


def test_a_crashing_format_is_a_plugin_bug_not_invalid_data(tmp_path, tiny, monkeypatch, capsys):
    fake_distribution(tmp_path / "site", "buggyplug", {"buggy": "buggy_fmt_mod"},
                      {"buggy_fmt_mod": BUGGY_FORMAT})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # record 2 makes the plugin raise ValueError; record 1 is invalid data (RecordError)
    recs = [{"q": "t|a", "answer": "b", "x": 1}, {"q": "bad", "answer": "c", "x": 2},
            {"q": "d", "answer": "e", "x": 3}]
    # a line that is not an object makes sftctl read the file with its careful json reader,
    # which checks each record with the format before any tokenization
    careful = recs[:1] + [{"q": "t|b", "answer": "c"}, recs[2], 42]
    for name, data in [("arrow", write_jsonl(tmp_path / "d.jsonl", recs)),
                       ("careful", write_jsonl(tmp_path / "m.jsonl", careful))]:
        base = ["train", "--plugin", "buggy", "--model", str(tiny), "--data", str(data),
                "--output-dir", str(tmp_path / name), "--max-steps", "1", "--quiet"]
        for extra in ([], ["--skip-invalid"]):  # --skip-invalid does not skip a plugin bug
            assert cli.main(base + extra) == 2, (name, extra)
            err = capsys.readouterr().err
            assert f"plugin 'buggy' failed in dataset format 'buggy' (to_segments) at " \
                   f"{data}: record 2 (line 3): ValueError: not enough values to unpack " \
                   "(expected 2, got 1) (a bug in the plugin, not " \
                   "invalid data: --skip-invalid does not skip it)" in err, (name, extra, err)
            assert "invalid record" not in err and "fix them or pass" not in err
            assert "sftctl --debug prints the traceback" in err
        assert cli.main(["--debug"] + base) == 2
        err = capsys.readouterr().err
        # the traceback goes into the plugin's function, even when a worker hit it first
        assert "buggy_fmt_mod.py" in err and 'record["q"].split("|")' in err


# ------------------------------------------------------------- options reach optimizer builders


def test_builders_get_the_plugin_options_when_they_ask():
    import torch

    seen = {}

    def build_opt(params, oc, device, options):
        seen["opt"] = options
        return torch.optim.SGD(params, lr=oc.lr * options["p.scale"])

    def build_sched(optimizer, total, warmup, oc, options):
        seen["sched"] = (total, warmup, options)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    old_style = OptimizerSpec("plain", lambda params, oc, device: ("plain", device))
    spec = OptimizerSpec("scaled", build_opt, uses_options=True)
    sched = SchedulerSpec("flat", build_sched, uses_options=True)

    class OC:
        lr = 0.5

    w = torch.nn.Parameter(torch.zeros(2))
    opt = spec.create([{"params": [w]}], OC, torch.device("cpu"), {"p.scale": 0.1})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and seen["opt"] == {"p.scale": 0.1}
    sched.create(opt, 10, 2, OC, {"p.scale": 0.1})
    assert seen["sched"] == (10, 2, {"p.scale": 0.1})
    assert old_style.create([], OC, "dev", {"p.scale": 1}) == ("plain", "dev")  # not opted in


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
def sftctl_train_start(run):
    EVENTS.append(("train_start", run.step))

@hookimpl
def sftctl_step_end(run, step, metrics):
    EVENTS.append(("step_end", step, round(metrics["loss"], 6)))

@hookimpl
def sftctl_evaluate(run, step, metrics):
    metrics["recorder"] = True
    EVENTS.append(("evaluate", step))

@hookimpl
def sftctl_save(run, path):
    EVENTS.append(("save", Path(path).name.startswith(".model.tmp"),
                   (Path(path) / "model.safetensors").is_file()))
    (Path(path) / "recorder.json").write_text(json.dumps(
        {"tag": run.config.option("recorder.tag")}))

@hookimpl
def sftctl_after_train(run, summary):
    EVENTS.append(("after_train", summary["steps"]))
    summary["recorder_order"] = len(EVENTS)
    summary["recorder_score"] = float("nan")  # summary.json must still be strict JSON

@hookimpl(wrapper=True)
def sftctl_after_train(run, summary):
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
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["recorder_score"] is None and summary["recorder_score_nonfinite"] == "nan"
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
