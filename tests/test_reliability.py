"""Non-finite guard and disk errors on the real CLI and trainer (tiny Llama, a few steps).

- An injected NaN (``SFTCTL_FAULT=nan_at_step:N``: the logits of step N are multiplied by NaN, so
  the loss and every gradient are NaN through the real backward) stops the run before the
  optimizer update; with ``--on-nonfinite skip`` the weights and optimizer state after the
  skipped step equal those before it, and a run of bad steps stops the run.
- The on-device guard (CUDA's mode: the optimizer gets the flag as ``found_inf``) is forced on
  the CPU and must give the same weights as the host check; on a GPU it must not sync.
- A save that fails (ENOSPC injected halfway through, a real full tmpfs, a real file-size limit,
  a real read-only directory, a file where the directory should be) leaves the previous
  checkpoint intact and ends the run with a named error, no traceback.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftctl.run import cli
from sftctl.training.checkpoint import inspect_checkpoint

from sftctl_testutil import cli_env, read_metrics
from sftctl_testutil import no_installed_plugins, tiny_alpaca_setup  # noqa: F401 (autouse)

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_alpaca_setup(tmp_path_factory, "reliability")


def train_args(setup, out: Path, *extra) -> list[str]:
    tmp, base, data = setup
    return ["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--seed", "5",
            "--scheduler", "constant", "--threads", "1", "--device", "cpu", "--no-eval",
            "--no-initial-eval",
            *extra]


def run(args, tmp, preexec=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftctl", *args], env=cli_env(tmp, **env),
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def weights(path: Path) -> dict:
    from sftctl.training.checkpoint import load_weights

    return load_weights(path / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                  if inspect_checkpoint(p).complete)


def assert_clean_failure(r, out: Path, *needles: str) -> None:
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-3000:])
    assert not (out / "model").exists() and not (out / "summary.json").exists()


# ------------------------------------------------------------------------------ non-finite


def test_nan_stops_before_the_update_and_saves_nothing(setup, tmp_path):
    out = tmp_path / "run"
    r = run(train_args(setup, out, "--save-every", "1", "--keep-last", "0"), tmp_path,
            SFTCTL_FAULT="nan_at_step:3")
    assert_clean_failure(r, out, "step 3: non-finite loss (nan)", "the step was not applied",
                         f"the last checkpoint {ckpt(out, 2)} is untouched")
    assert complete_steps(out) == [1, 2]
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == [1, 2]


def test_nan_skip_leaves_weights_and_optimizer_unchanged(setup, tmp_path):
    out = tmp_path / "run"
    r = run(train_args(setup, out, "--save-every", "1", "--keep-last", "0", "--on-nonfinite",
                       "skip"), tmp_path, SFTCTL_FAULT="nan_at_step:3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: non-finite loss (nan) or gradient norm (nan): step skipped" in r.stderr
    assert complete_steps(out) == [1, 2, 3, 4, 5]
    w2, w3, w4 = (weights(ckpt(out, s)) for s in (2, 3, 4))
    assert same(w2, w3)  # the skipped step changed no weight
    assert not same(w3, w4)  # and training went on
    s2, s3 = (torch.load(ckpt(out, s) / "trainer_state.pt", weights_only=True) for s in (2, 3))
    for pid, st in s2["optimizer"]["state"].items():
        for k, v in st.items():  # moments and the step count of every parameter
            assert torch.equal(v, s3["optimizer"]["state"][pid][k]), (pid, k)
    assert s3["state"]["step"] == 3 and s3["state"]["nonfinite_skipped"] == 1
    line = [x for x in read_metrics(out) if x["kind"] == "train"][2]
    assert line["step"] == 3 and line["skipped_nonfinite"] is True
    assert line["loss"] is None and line["loss_nonfinite"] == "nan"  # strict JSON
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == STEPS


def test_skip_stops_after_too_many_in_a_row(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3-5")
    out = tmp_path / "run"
    rc = cli.main(train_args(setup, out, "--on-nonfinite", "skip", "--max-nonfinite-in-a-row",
                             "2", "--quiet"))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "2 non-finite steps in a row (the last at step 4" in err
    assert not (out / "model").exists()


def make_trainer(setup, out: Path, **train):
    from sftctl.run.config import build_config
    from sftctl.run.plugin_manager import get_plugin_manager
    from sftctl.training.trainer import Trainer

    tmp, base, data = setup
    pm = get_plugin_manager(entry_points=False)
    cfg = build_config([("test", {
        "model": {"name_or_path": str(base)}, "data": {"paths": [str(data)]},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"output_dir": str(out), "max_steps": STEPS, "batch_size": 4, "seed": 5,
                  "quiet": True, "device": "cpu", **train},
        "eval": {"initial": False, "enabled": False}})], pm.config_options())
    t = Trainer(cfg, pm)
    t.setup()
    return t


def state(t) -> dict:
    return {k: v.detach().clone() for k, v in t.unwrapped_model.state_dict().items()}


def test_on_device_guard_masks_exactly_like_the_host_check(setup, tmp_path, monkeypatch):
    """CUDA's guard mode, forced on the CPU (torch's fused AdamW takes ``found_inf`` there too):
    the flag never leaves the device between logging boundaries, yet the weights equal the host
    check's; under stop every update from the bad step on is masked until the flag is read."""
    from sftctl.errors import TrainingError

    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3")
    host = make_trainer(setup, tmp_path / "host", on_nonfinite="skip")
    assert host.guard.mode == "host"
    host.train()
    dev = make_trainer(setup, tmp_path / "dev", on_nonfinite="skip", log_every=4)
    dev.guard.mode = "device"
    dev.train()
    assert same(state(host), state(dev))
    assert host.state.nonfinite_skipped == dev.state.nonfinite_skipped == 1
    assert [h.get("skipped_nonfinite") for h in host.state.history][2] is True

    monkeypatch.delenv("SFTCTL_FAULT")
    two = make_trainer(setup, tmp_path / "two", max_steps=2)  # constant LR: same first 2 steps
    two.train()
    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3")
    stop = make_trainer(setup, tmp_path / "stop", log_every=4)
    stop.guard.mode = "device"
    with pytest.raises(TrainingError, match=r"step 3: non-finite .* detected at step 4; no "
                                            r"update was applied from step 3 on"):
        stop.train()
    assert same(state(stop), state(two))  # steps 3 and 4 were both masked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_guard_adds_no_host_sync_between_logging_boundaries(setup, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3")
    t = make_trainer(setup, tmp_path / "cuda", on_nonfinite="skip", log_every=3, device="cuda",
                     precision="bf16")
    assert t.guard.mode == "device"
    guard_check, masked = t.guard.check, t.guard.masked_update
    calls = []

    def check(loss, grad_norm, step, sync):
        # everything the guard does on a step that is not a logging boundary: no sync allowed
        torch.cuda.set_sync_debug_mode(0 if sync else "error")
        try:
            return guard_check(loss, grad_norm, step, sync)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            calls.append(sync)

    def masked_update(optimizer):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            sync = calls[-1]
            with masked(optimizer):
                torch.cuda.set_sync_debug_mode(0 if sync else "error")
                try:
                    yield
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        return ctx()

    t.guard.check, t.guard.masked_update = check, masked_update
    t.train()
    assert calls.count(False) >= 3
    assert t.state.nonfinite_skipped == 1


# ------------------------------------------------------------------------------ disk errors


@pytest.fixture(scope="module")
def good(setup):
    """A complete step-2 checkpoint to continue from (the next save, at step 4, fails)."""
    tmp = setup[0]
    out = tmp / "good"
    r = run(train_args(setup, out, "--save-every", "2"), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return ckpt(out, 2)


def resume_args(setup, out: Path) -> list[str]:
    return train_args(setup, out, "--save-every", "2", "--resume")


def seed_run(good: Path, out: Path) -> Path:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(good, out / "checkpoints" / good.name)
    return out / "checkpoints"


def assert_previous_intact(out: Path) -> None:
    assert complete_steps(out) == [2]
    assert not any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())


def test_no_space_injected_halfway_through_a_save(setup, good, tmp_path):
    out = tmp_path / "run"
    seed_run(good, out)
    r = run(resume_args(setup, out), tmp_path, SFTCTL_FAULT="save_enospc:4")
    assert_clean_failure(r, out, f"cannot save the checkpoint {ckpt(out, 4)}",
                         "no space left on the device [ENOSPC]",
                         f"the previous checkpoint {ckpt(out, 2)} is intact")
    assert_previous_intact(out)


def test_a_real_file_size_limit_fails_the_save_cleanly(setup, good, tmp_path):
    """RLIMIT_FSIZE: the kernel refuses a write past 250 kB with EFBIG (Python ignores
    SIGXFSZ); the trainer state of this model is larger, its other files are smaller."""
    out = tmp_path / "run"
    seed_run(good, out)
    limit = 250_000
    assert (good / "trainer_state.pt").stat().st_size > limit

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(resume_args(setup, out), tmp_path, preexec=preexec)
    assert_clean_failure(r, out, f"cannot save the checkpoint {ckpt(out, 4)}",
                         "file too large (filesystem or process file-size limit) [EFBIG]",
                         f"the previous checkpoint {ckpt(out, 2)} is intact")
    assert_previous_intact(out)


def in_mount_namespace(setup_mount: str, args: list[str], out: Path, tmp: Path):
    """Run the CLI in a private mount namespace (root with CAP_SYS_ADMIN): ``setup_mount``
    prepares ``$CK`` (the checkpoints directory); what the run left there is copied to
    ``$AFTER`` before the namespace (and its mount) goes away. None when not possible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    ck, after = out / "checkpoints", out / "after"
    after.mkdir()
    script = f"""
set -u
{setup_mount} || exit 99
"$PY" -m sftctl "$@" >"$LOG" 2>&1
rc=$?
cp -a "$CK/." "$AFTER/"
exit $rc
"""
    env = cli_env(tmp, CK=str(ck), AFTER=str(after), PY=sys.executable,
                  LOG=str(out / "stderr.log"))
    p = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    if p.returncode == 99 or "unshare failed" in p.stderr:
        return None
    err = (out / "stderr.log").read_text() if (out / "stderr.log").exists() else p.stderr
    return subprocess.CompletedProcess(p.args, p.returncode, "", err)


def test_a_real_full_filesystem_fails_the_save_cleanly(setup, good, tmp_path):
    """A tmpfs with room for the copied step-2 checkpoint and ~100 kB more."""
    out = tmp_path / "run"
    size = sum(f.stat().st_size for f in good.iterdir()) + 100_000
    seed = tmp_path / "seed"
    shutil.copytree(good, seed / good.name)
    (out / "checkpoints").mkdir(parents=True)
    r = in_mount_namespace(f'mount -t tmpfs -o size={size} tmpfs "$CK" && '
                           f'cp -a "{seed}/{good.name}" "$CK/"', resume_args(setup, out), out,
                           tmp_path)
    if r is None:
        pytest.skip("mounting a tmpfs needs root and unshare (covered by the ENOSPC fault)")
    assert_clean_failure(r, out, f"cannot save the checkpoint {ckpt(out, 4)}",
                         "no space left on the device [ENOSPC]",
                         f"the previous checkpoint {ckpt(out, 2)} is intact")
    after = out / "after"
    assert sorted(p.name for p in after.iterdir()) == [good.name]
    assert inspect_checkpoint(after / good.name).complete


def test_a_read_only_checkpoint_directory_fails_the_save_cleanly(setup, good, tmp_path):
    """chmod where it binds (not root); as root a read-only bind mount in a private mount
    namespace (root ignores permission bits)."""
    out = tmp_path / "run"
    if os.geteuid() != 0:
        ck = seed_run(good, out)
        ck.chmod(0o555)
        try:
            r = run(resume_args(setup, out), tmp_path)
        finally:
            ck.chmod(0o755)
        expected = "permission denied [EACCES]"
        after = ck
    else:
        seed = tmp_path / "seed"
        shutil.copytree(good, seed / good.name)
        (out / "checkpoints").mkdir(parents=True)
        r = in_mount_namespace(f'cp -a "{seed}/{good.name}" "$CK/" && mount --bind "$CK" "$CK" '
                               '&& mount -o remount,bind,ro "$CK"', resume_args(setup, out),
                               out, tmp_path)
        if r is None:
            pytest.skip("root without mount namespaces: see the file-in-place test")
        expected = "read-only filesystem [EROFS]"
        after = out / "after"
    assert_clean_failure(r, out, f"cannot save the checkpoint {ckpt(out, 4)}", expected,
                         f"the previous checkpoint {ckpt(out, 2)} is intact")
    assert sorted(p.name for p in after.iterdir()) == [good.name]
    assert inspect_checkpoint(after / good.name).complete


def test_a_file_where_the_checkpoint_directory_should_be(setup, tmp_path, capsys):
    """Works as any user: the directory cannot be created, the run ends with a named error."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    rc = cli.main(train_args(setup, out, "--save-every", "2", "--resume", "--quiet"))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"cannot save the checkpoint {ckpt(out, 2)}" in err and "[EEXIST]" in err
    assert "no earlier checkpoint exists" in err
    assert not (out / "model").exists()
