"""The CLI's OpenMP wait-policy choice (sftctl/_runtime.py), with real busy processes on the
cores: PASSIVE when other work runs, the user's own setting kept, library imports untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sftctl import _runtime

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\n"


@pytest.fixture
def busy_cores():
    """Two processes spinning on the CPU (>= 0.5 busy cores on any machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def env_without_policy(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(SFTCTL_DISABLE_PLUGIN_AUTOLOAD="1", **extra)
    return env


@pytest.mark.parametrize("argv, cli", [
    (["/usr/bin/sftctl", "train"], True), (["-m", "train"], True), (["sftctl"], True),
    (["/usr/bin/pytest"], False), (["-c"], False), ([], False), (["/x/sftctl.py"], False),
])
def test_started_as_cli(argv, cli):
    assert _runtime.started_as_cli(argv) is cli


def test_busy_cores_are_measured(busy_cores):
    assert _runtime.busy_cores() >= 1.0


def test_the_policy_becomes_passive_only_for_the_cli_and_never_over_the_user(busy_cores):
    env = {}
    why = _runtime.choose_omp_wait_policy(env, ["/bin/sftctl"], torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and "cores busy" in why
    env = {"OMP_WAIT_POLICY": "active"}
    assert _runtime.choose_omp_wait_policy(env, ["/bin/sftctl"], torch_loaded=False) is None
    assert env == {"OMP_WAIT_POLICY": "active"}
    for argv, loaded in ((["/bin/pytest"], False), (["/bin/sftctl"], True)):
        env = {}
        assert _runtime.choose_omp_wait_policy(env, argv, torch_loaded=loaded) is None
        assert env == {}  # torch already loaded: too late to matter; not the CLI: not ours


def test_the_real_cli_reports_its_choice(busy_cores):
    r = subprocess.run([sys.executable, "-m", "sftctl", "doctor", "--json"],
                       env=env_without_policy(), capture_output=True, text=True)
    t = json.loads(r.stdout)["cpu_threads"]
    assert t["omp_wait_policy"] == "PASSIVE" and "cores busy" in t["omp_wait_policy_set_by_sftctl"]
    r = subprocess.run([sys.executable, "-m", "sftctl", "doctor", "--json"],
                       env=env_without_policy(OMP_WAIT_POLICY="active"), capture_output=True,
                       text=True)
    t = json.loads(r.stdout)["cpu_threads"]
    assert t == {**t, "omp_wait_policy": "active", "omp_wait_policy_set_by_sftctl": None}


def test_a_library_import_leaves_the_environment_alone(busy_cores):
    r = subprocess.run([sys.executable, "-c", "import os, sftctl; "
                        "print(os.environ.get('OMP_WAIT_POLICY'), sftctl.OMP_WAIT_POLICY_REASON)"],
                       env=env_without_policy(), capture_output=True, text=True)
    assert r.stdout.split() == ["None", "None"], r.stderr[-2000:]
