"""Reliability, round 2 (issue 16), on the real CLI and the real trainer (tiny Llama, a few steps):

- ``--overwrite`` loses nothing: the previous run is moved aside and comes back when the new run
  fails before it has a checkpoint or a model (bad data, a model inside the directory, a NaN at
  step 1, a kill -9); it goes only when the new run has a result.
- One run per directory: an OS lock (flock) taken before anything else; a second run is refused
  at once naming the holder; the lock dies with its process (kill -9 leaves none behind).
- Leftovers (``.summary.json.tmp-PID``, ``.model.old-PID``, ``.step-N.tmp``) are resolved at the
  next start and never read as results.
- No non-finite weight is ever saved (``--lr`` overflowing the update), hyperparameters that
  cannot train are config errors.
- Every write site of a checkpoint and of the final model ends in the named disk error on a real
  full tmpfs (or a real RLIMIT_FSIZE), the previous checkpoint intact.
- Resume verifies the data (token ids and masks, not only lengths) and each checkpoint file's
  content hash; a base model with missing weights is an error unless allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftctl_testutil import cli_env, write_jsonl
from sftctl_testutil import no_installed_plugins, tiny_alpaca_setup  # noqa: F401 (autouse)

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_alpaca_setup(tmp_path_factory, "reliability2")


def train_args(setup, out: Path, *extra, model=None, data=None) -> list[str]:
    tmp, base, d = setup
    return ["train", "--model", str(model or base), "--data", str(data or d),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--lr", "3e-3", "--seed", "5", "--scheduler", "constant", "--threads", "1",
            "--device", "cpu", "--no-eval", "--no-initial-eval", *extra]


def run(args, tmp, preexec=None, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftctl", *args], env=cli_env(tmp, **env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def start(args, tmp, **env) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"bg-{time.monotonic_ns()}.log"
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "sftctl", *args], env=cli_env(tmp, **env),
                         stdout=f, stderr=subprocess.STDOUT)
    f.close()
    return p, log


def wait_for(cond, timeout=120.0, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory (but the lock) by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".sftctl.lock"}


@pytest.fixture(scope="module")
def finished(setup):
    """A finished run (with a checkpoint at step 2) to overwrite; copied by each test."""
    tmp = setup[0]
    out = tmp / "finished"
    r = run(train_args(setup, out, "--save-every", "2"), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_run(finished: Path, dest: Path) -> tuple[Path, dict]:
    shutil.copytree(finished, dest)
    return dest, snapshot(dest)


# ------------------------------------------------------------------------------- --overwrite


def test_overwrite_with_missing_data_keeps_the_previous_run(setup, finished, tmp_path):
    out, before = copy_run(finished, tmp_path / "run")
    r = run(train_args(setup, out, "--overwrite", data=tmp_path / "nope.jsonl"), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert "the previous run of" in r.stderr and "is restored" in r.stderr
    assert snapshot(out) == before  # byte for byte, config.yaml included
    assert not (out / ".previous-run").exists()


def test_overwrite_refuses_a_model_inside_the_directory_it_replaces(setup, finished, tmp_path):
    out, before = copy_run(finished, tmp_path / "run")
    r = run(train_args(setup, out, "--overwrite", model=out / "model"), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"--model {out / 'model'} lies inside {out / 'model'}, which --overwrite replaces; " \
           f"copy it out of {out} first" in r.stderr
    assert snapshot(out) == before


def test_overwrite_failing_at_step_1_restores_the_previous_run(setup, finished, tmp_path):
    out, before = copy_run(finished, tmp_path / "run")
    r = run(train_args(setup, out, "--overwrite"), tmp_path, SFTCTL_FAULT="nan_at_step:1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "step 1: non-finite loss" in r.stderr
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_once_the_new_one_is_complete(setup, finished, tmp_path):
    out, before = copy_run(finished, tmp_path / "run")
    r = run(train_args(setup, out, "--overwrite", "--seed", "6"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    after = snapshot(out)
    assert after["summary.json"] != before["summary.json"]
    assert not any(k.startswith("checkpoints/") for k in after)  # the old run's are gone too
    assert not (out / ".previous-run").exists()
    assert "--seed: 6" not in after["config.yaml"].decode() and "seed: 6" in \
        after["config.yaml"].decode()


def test_overwrite_killed_before_a_result_gets_the_previous_run_back(setup, finished, tmp_path):
    """kill -9 during the new run's first steps; the next start (here one that is refused
    because the directory holds a run) restores the previous run, and the lock is free."""
    out, before = copy_run(finished, tmp_path / "run")
    p, log = start(train_args(setup, out, "--overwrite", "--max-steps", "50"), tmp_path,
                   SFTCTL_FAULT="slow_steps:0.3")
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and (out / ".previous-run").is_dir(),
                 what="the new run's first step")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert (out / ".previous-run" / "summary.json").is_file()
    r = run(train_args(setup, out), tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr[-3000:]
    assert "the previous run is restored" in r.stderr
    assert snapshot(out) == before


# ------------------------------------------------------------------------------ one run per dir


def test_a_second_run_in_the_same_directory_is_refused_at_once(setup, tmp_path):
    out = tmp_path / "run"
    # the first run holds its lock for at least 8 x 4 s after it appears, longer than the
    # second CLI may take to start and be refused (< 30 s below) on a loaded 2-core machine;
    # with 8 x 0.2 s the first run could finish first and the second one then trained
    p, log = start(train_args(setup, out, "--max-steps", "8"), tmp_path,
                   SFTCTL_FAULT="slow_steps:4")
    try:
        wait_for(lambda: f"PID {p.pid} " in ((out / ".sftctl.lock").read_text()
                                             if (out / ".sftctl.lock").exists() else ""),
                 what="the first run's lock")
        t0 = time.monotonic()
        r = run(train_args(setup, out, "--overwrite"), tmp_path)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"{out} is in use by another sftctl run (PID {p.pid} on host " \
               f"{socket.gethostname()}, started" in r.stderr
        assert took < 30  # refused before loading anything (the CLI's start-up dominates)
        assert p.wait(240) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8  # the first run's result, untouched by the refused one


def test_simultaneous_starts_one_trains_the_other_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    procs = [start(train_args(setup, out, "--max-steps", "3"), tmp_path,
                   SFTCTL_FAULT="slow_steps:0.3") for _ in range(2)]
    rcs = [p.wait(300) for p, _ in procs]
    logs = [log.read_text() for _, log in procs]
    assert sorted(rcs) == [0, 2], logs
    loser = logs[rcs.index(2)]
    assert "is in use by another sftctl run" in loser or "already holds a run" in loser, loser
    assert "Traceback" not in loser and "ENOENT" not in loser
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_the_lock_dies_with_its_process(setup, tmp_path):
    out = tmp_path / "run"
    p, _ = start(train_args(setup, out, "--max-steps", "50"), tmp_path,
                 SFTCTL_FAULT="slow_steps:0.3")
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), what="the first step")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    r = run(train_args(setup, out, "--overwrite"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_torchrun_ranks_share_rank_0s_lock(tmp_path):
    """Only rank 0 locks (the others write only into what it created): the lock of another
    rank's process must not be taken."""
    from sftctl.run.rundir import RunDirLock

    with RunDirLock(tmp_path / "run") as held:
        assert held.path.read_text().startswith(f"PID {os.getpid()} on host")
        with pytest.raises(Exception, match="is in use by another sftctl run"):
            RunDirLock(tmp_path / "run").acquire()  # a second descriptor: a second run
    RunDirLock(tmp_path / "run").acquire().release()  # released: free again


# ----------------------------------------------------------------------------------- leftovers


def test_leftovers_of_a_killed_run_are_resolved_at_the_next_start(setup, finished, tmp_path):
    out, before = copy_run(finished, tmp_path / "run")
    (out / ".summary.json.tmp-99999").write_text('{"status": "complete", "half')
    (out / ".metrics.jsonl.tmp-4242").write_text("x")
    # killed between the two renames of the final model: model/ is missing, the old one aside
    os.replace(out / "model", out / ".model.old-31337")
    r = run(train_args(setup, out), tmp_path)
    # refused (the directory holds a run), after the cleanup that runs under the lock
    assert r.returncode == 2, r.stderr[-3000:]
    assert "already holds a run" in r.stderr and "leftovers of an interrupted run" in r.stderr
    assert "restored model from .model.old-31337" in r.stderr
    assert snapshot(out) == before  # model/ back, every partial file gone


def test_a_partial_checkpoint_is_removed_at_the_next_start(setup, tmp_path):
    """``.step-N.tmp`` of a save that failed or was killed: never resumed from, removed when
    the next run sets up (the checkpointer's cleanup)."""
    out = tmp_path / "run"
    tmpdir = out / "checkpoints" / ".step-00000002.tmp"
    tmpdir.mkdir(parents=True)
    (tmpdir / "trainer_state.pt").write_bytes(b"\0" * 10)
    r = run(train_args(setup, out, "--save-every", "2", "--resume"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no complete checkpoint" in r.stderr  # the partial one was not taken for one
    assert "removed 1 leftover temporary checkpoint directory" in r.stderr
    assert not tmpdir.exists()


# ------------------------------------------------------------------- a full disk, every site


@pytest.fixture(scope="module")
def seed_6(setup):
    """A run of 6 steps with checkpoints at 2 and 4, cut back to step 2 (as if killed after
    it): resuming it saves step 4 (checkpoint sites) and then the final model (model sites)."""
    tmp = setup[0]
    out = tmp / "seed6"
    r = run(train_args(setup, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0"),
            tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    seed = tmp / "seed6-cut"
    (seed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000002", seed / "checkpoints" / "step-00000002")
    shutil.copy(out / "config.yaml", seed / "config.yaml")
    return seed


def on_small_tmpfs(seed: Path, args: list[str], out: Path, tmp: Path, fault: str):
    """The CLI with OUT on a private 32 MiB tmpfs (a mount namespace; root only) seeded with
    ``seed``; what it left is copied to OUT-after. None when mounting is not possible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    after = tmp / "after"
    out.mkdir(parents=True)
    after.mkdir()
    script = f"""
set -u
mount -t tmpfs -o size=32m tmpfs "{out}" || exit 99
cp -a "{seed}/." "{out}/"
"$PY" -m sftctl "$@" >"{tmp}/stderr.log" 2>&1
rc=$?
cp -a "{out}/." "{after}/"
exit $rc
"""
    p = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args],
                       env=cli_env(tmp, PY=sys.executable, SFTCTL_FAULT=fault),
                       capture_output=True, text=True, timeout=300)
    if p.returncode == 99:
        return None
    return subprocess.CompletedProcess(p.args, p.returncode, "",
                                       (tmp / "stderr.log").read_text()), after


SITES = {  # fault site -> (what the error names, the checkpoint that must be intact)
    "ckpt_weights": ("the checkpoint {out}/checkpoints/step-00000004", 2),
    "ckpt_state": ("the checkpoint {out}/checkpoints/step-00000004", 2),  # torch.save
    "ckpt_config": ("the checkpoint {out}/checkpoints/step-00000004", 2),
    "ckpt_marker": ("the checkpoint {out}/checkpoints/step-00000004", 2),
    "model_weights": ("the final model {out}/model", 4),                   # save_pretrained
    "model_tokenizer": ("the final model {out}/model", 4),                 # tokenizer files
    "model_files": ("the final model {out}/model", 4),
    "summary": ("training output in {out}", 4),                            # summary.json
}


@pytest.mark.parametrize("site", list(SITES))
def test_a_full_disk_at_every_write_site_is_the_named_error(setup, seed_6, tmp_path, site):
    from sftctl.training.checkpoint import inspect_checkpoint

    out = tmp_path / "run"
    args = train_args(setup, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0",
                      "--resume")
    res = on_small_tmpfs(seed_6, args, out, tmp_path, f"disk_full_at:{site}")
    if res is None:
        pytest.skip("mounting a tmpfs needs root and unshare")
    r, after = res
    what, intact = SITES[site]
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "unexpected pos" not in r.stderr, r.stderr[-3000:]
    assert f"cannot save {what.format(out=out)}: no space left on the device [ENOSPC]" \
        in r.stderr, r.stderr[-3000:]
    good = after / "checkpoints" / f"step-{intact:08d}"
    assert f"the previous checkpoint {out}/checkpoints/step-{intact:08d} is intact" in r.stderr
    assert inspect_checkpoint(good).complete
    assert not (after / "summary.json").exists()
    assert (after / "model").exists() == (site == "summary")  # written before summary.json
    # nothing partial is left that could pass for a result
    left = [p.name for p in after.iterdir()] + [p.name for p in (after / "checkpoints").iterdir()]
    assert not [n for n in left if ".tmp" in n or ".old" in n], left


# ------------------------------------------------------------------ non-finite weights, config


@pytest.mark.parametrize("master", [[], ["--precision", "bf16", "--master-weights", "split"]],
                         ids=["fp32", "split"])
def test_an_overflowing_update_stops_the_run_and_saves_nothing(setup, tmp_path, master):
    """lr 1e38: step 1's loss and gradient norm are finite, its update is not. With split
    master weights their step's own check joins the guard's read of the other weights."""
    out = tmp_path / "run"
    r = run(train_args(setup, out, "--lr", "1e38", "--save-every", "1", *master), tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "step 1: the optimizer update made parameters non-finite although the loss and " \
           "gradient norm were finite" in r.stderr
    assert "--on-nonfinite skip" not in r.stderr  # skipping cannot undo an applied update
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "nan", "optim.lr: nan is not a finite number"),
    ("--lr", "inf", "optim.lr: inf is not a finite number"),
    ("--grad-clip", "inf", "optim.grad_clip: inf is not a finite number"),
    ("--adam-eps=-1e-8", None, "optim.eps: -1e-08 is below the minimum 0.0"),
])
def test_hyperparameters_that_cannot_train_are_config_errors(setup, tmp_path, flag, value,
                                                             message):
    r = run(train_args(setup, tmp_path / "run", flag, *([value] if value else [])), tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stopping_after_skips_does_not_suggest_skip(setup, tmp_path):
    r = run(train_args(setup, tmp_path / "run", "--on-nonfinite", "skip",
                       "--max-nonfinite-in-a-row", "2"), tmp_path, SFTCTL_FAULT="nan_at_step:2-3")
    assert r.returncode == 1 and "2 non-finite steps in a row" in r.stderr, r.stderr[-3000:]
    assert "pass --on-nonfinite skip" not in r.stderr


def test_quoted_numbers_and_warmup_conflicts(setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('train:\n  max_steps: "10"\n')
    r = run(["train", "--config", str(cfg), "--print-config"], tmp_path)
    assert r.returncode == 2 and "train.max_steps" in r.stderr and "'10'" in r.stderr, r.stderr
    cfg.write_text("optim:\n  lr: 1e-3\n")  # PyYAML reads it as a string: still a float
    r = run(["train", "--config", str(cfg), "--print-config"], tmp_path)
    assert r.returncode == 0 and "lr: 0.001" in r.stdout, r.stderr
    r = run(train_args(setup, tmp_path / "c", "--warmup-steps", "2", "--warmup-ratio", "0.1"),
            tmp_path)
    assert r.returncode == 2 and "optim.warmup_ratio (0.1) exclude each other" in r.stderr


# ---------------------------------------------------------------- resume verifies what it uses


@pytest.fixture(scope="module")
def interrupted(setup):
    """A 6-step run with checkpoints at 2 and 4 whose end was lost (model/, summary removed)."""
    tmp = setup[0]
    out = tmp / "interrupted"
    r = run(train_args(setup, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0"),
            tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    return out


def test_resume_refuses_data_with_the_same_lengths_but_other_tokens(setup, tmp_path):
    """Same path, same token counts, answers reversed: the fingerprint of ids and masks
    differs (a fingerprint of lengths would not)."""
    from transformers import AutoTokenizer

    tmp, base, data = setup
    mine = tmp_path / "train.jsonl"
    shutil.copy(data, mine)
    out = tmp_path / "run"
    args = train_args(setup, out, "--max-steps", "6", "--save-every", "2", data=mine)
    r = run(args, tmp_path, SFTCTL_FAULT="nan_at_step:5")  # stops after the step-4 checkpoint
    assert r.returncode == 1 and (out / "checkpoints" / "step-00000004").is_dir(), r.stderr
    tok = AutoTokenizer.from_pretrained(base)
    records = [json.loads(x) for x in mine.read_text().splitlines()]
    changed = 0
    for rec in records:  # reverse answers whose token count does not change
        rev = rec["output"][::-1]
        if rev != rec["output"] and len(tok(rev)["input_ids"]) == \
                len(tok(rec["output"])["input_ids"]):
            rec["output"] = rev
            changed += 1
    assert changed >= 3
    write_jsonl(mine, records)
    r = run([*args, "--resume"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "the tokenized training data differs from the checkpoint's" in r.stderr


def test_a_checkpoint_changed_in_place_is_not_resumed(setup, interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    w = out / "checkpoints" / "step-00000004" / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit of the last weight: same size, still finite
    w.write_bytes(bytes(raw))
    r = run(train_args(setup, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0",
                       "--resume"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {out / 'checkpoints' / 'step-00000004'} is not usable: model.safetensors " \
           "changed after the save" in r.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'}" in r.stderr


def test_a_base_model_with_missing_weights_needs_a_flag(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(setup[1], base)
    sd = load_file(str(base / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    r = run(train_args(setup, tmp_path / "a", model=base), tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "1 weight(s) missing from the checkpoint (randomly initialised): " \
           "model.layers.1.mlp.up_proj.weight. Pass --allow-missing-weights" in r.stderr
    r = run(train_args(setup, tmp_path / "b", "--allow-missing-weights", model=base), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
