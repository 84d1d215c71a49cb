"""Exact resume through the real CLI: kill -9 mid-run, SIGTERM/SIGINT preemption, a crash inside a
save, checkpoint rotation and contents, and the refusals (changed config, finished run).

Every run trains a tiny Llama with attention dropout on (so the restored RNG state matters),
validation every 4 steps, gradient accumulation over an epoch boundary with a short last group,
and compares the resumed run with one uninterrupted run: per-step losses, gradient norms,
learning rates and validation losses must be *equal* (not close), and so must the final weights.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftctl.run import cli

from sftctl_testutil import TINY_OVERRIDES, alpaca_records, cli_env, read_metrics, write_jsonl
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

STEPS = 12


def build_dropout_base(out_dir: Path) -> Path:
    """The tests' tiny Llama with attention dropout, so that a resume without the RNG state
    would change the losses."""
    from sftctl.plugins.alpaca import demo_data, demo_model

    tok = demo_model.build_tokenizer(demo_data.generate(300, seed=11), vocab_size=512)
    model = demo_model.build_model(tok, seed=0, overrides={**TINY_OVERRIDES,
                                                           "attention_dropout": 0.1})
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    base = build_dropout_base(tmp / "base")
    # 44 records, batch 4, accum 2: 11 micro-batches per epoch, so 6 steps per epoch with a
    # last step of one micro-batch; 12 steps cross the epoch boundary
    data = write_jsonl(tmp / "train.jsonl", alpaca_records(44, seed=21))
    val = write_jsonl(tmp / "val.jsonl", alpaca_records(8, seed=22))
    return tmp, base, data, val


def train_args(setup, out: Path, *extra) -> list[str]:
    tmp, base, data, val = setup
    return ["train", "--model", str(base), "--data", str(data), "--val-data", str(val),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2", "--seed", "7",
            "--eval-every", "4", "--save-every", "2", "--keep-last", "2", "--threads", "1",
            "--device", "cpu", "--no-eval", *extra]  # exactness is promised on the CPU


def run(args, tmp, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftctl", *args], env=cli_env(tmp, **env),
                          capture_output=True, text=True, timeout=timeout)


class Background:
    """The CLI in a child process, its output in files (no pipe to fill up)."""

    def __init__(self, args, tmp: Path, **env):
        self.log = tmp / f"bg-{time.monotonic_ns()}.log"
        self.f = open(self.log, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "sftctl", *args],
                                  env=cli_env(tmp, **env), stdout=self.f, stderr=subprocess.STDOUT)

    def wait_for(self, cond, what: str, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if self.p.poll() is not None:
                pytest.fail(f"the run ended (rc {self.p.returncode}) before {what}:\n"
                            f"{self.output()[-3000:]}")
            time.sleep(0.02)
        self.p.kill()
        pytest.fail(f"timed out waiting for {what}")

    def wait(self, timeout: float = 240) -> int:
        rc = self.p.wait(timeout)
        self.f.close()
        return rc

    def output(self) -> str:
        if not self.f.closed:
            self.f.flush()
        return self.log.read_text()


def train_steps_logged(out: Path) -> int:
    """Train lines in metrics.jsonl so far (the writer may be in the middle of a line)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"kind": "train"' in line)


def resume_in_process(args, capsys) -> str:
    """The resumed run in this process (saves the interpreter start-up; same thread count)."""
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    return err


def curves(out: Path):
    m = read_metrics(out)
    train = [(x["step"], x["loss"], x["grad_norm"], x["lr"], x["tokens_total"])
             for x in m if x["kind"] == "train"]
    val = [(x["step"], x["val_loss"]) for x in m if x["kind"] == "val"]
    return train, val


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = curves(out), curves(ref)
    assert [s for s, *_ in got[0]] == list(range(1, STEPS + 1))
    assert got[0] == want[0]  # per-step loss, grad norm, lr, token counter: exactly equal
    assert got[1] == want[1]  # validation losses (steps 0, 4, 8, 12)
    a, b = final_weights(out), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((out / "summary.json").read_text())
    r = json.loads((ref / "summary.json").read_text())
    for key in ("steps", "tokens", "trainable_tokens", "epochs", "final_loss", "val_loss"):
        assert s[key] == r[key], key


def markers(out: Path) -> dict[int, dict]:
    return {int(p.parent.name.split("-")[1]): json.loads(p.read_text())
            for p in (out / "checkpoints").glob("step-*/COMPLETE")}


@pytest.fixture(scope="module")
def reference(setup):
    tmp = setup[0]
    out = tmp / "reference"
    r = run(train_args(setup, out), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------- the contents


def test_checkpoint_layout_rotation_and_loading(reference):
    ck = reference / "checkpoints"
    # saves at 2, 4, ..., 10 (the final step goes to model/); --keep-last 2 leaves 8 and 10
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000008", "step-00000010"]
    m = markers(reference)[10]
    assert m["step"] == 10 and m["reason"] == "periodic" and m["world_size"] == 1
    for name, size in m["files"].items():
        assert (ck / "step-00000010" / name).stat().st_size == size
    assert set(m["files"]) == {"model.safetensors", "trainer_state.pt", "sftctl_config.yaml"}
    # other state: plain types and tensors only
    sd = torch.load(ck / "step-00000010" / "trainer_state.pt", weights_only=True)
    assert sd["state"]["step"] == 10 and sd["format"] == 1
    assert {"optimizer", "scheduler", "scaler", "rng", "state"} <= set(sd)
    assert {"python", "numpy", "torch"} <= set(sd["rng"])
    # weights: safetensors, tied embeddings stored once and restored as an alias
    from sftctl.training.checkpoint import load_weights

    w = load_weights(ck / "step-00000010" / "model.safetensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference / "model")
    assert set(w) == set(model.state_dict())


def test_incomplete_or_damaged_checkpoints_are_never_resumed_from(reference, tmp_path):
    from sftctl.training.checkpoint import inspect_checkpoint, latest_checkpoint

    ck = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", ck)
    newest = ck / "step-00000010"
    assert latest_checkpoint(ck).path == newest
    # a truncated file: the marker's size no longer matches
    with open(newest / "trainer_state.pt", "r+b") as f:
        f.truncate(1000)
    info = inspect_checkpoint(newest)
    assert not info.complete and "trainer_state.pt has 1000 bytes" in info.problem
    assert latest_checkpoint(ck).path == ck / "step-00000008"
    # no marker at all
    (ck / "step-00000008" / "COMPLETE").unlink()
    assert "no completion marker" in inspect_checkpoint(ck / "step-00000008").problem
    assert latest_checkpoint(ck) is None


# ---------------------------------------------------------------------------- kill and resume


def test_kill9_mid_run_then_resume_equals_the_uninterrupted_run(setup, reference, tmp_path,
                                                                  capsys):
    out = tmp_path / "run"
    bg = Background(train_args(setup, out), tmp_path, SFTCTL_FAULT="slow_steps:0.25")
    bg.wait_for(lambda: (out / "checkpoints" / "step-00000004" / "COMPLETE").exists(),
                "the step-4 checkpoint")
    bg.p.send_signal(signal.SIGKILL)  # mid-step or mid-save: whatever it was doing
    assert bg.wait() == -signal.SIGKILL
    assert not (out / "model").exists()
    err = resume_in_process(train_args(setup, out, "--resume"), capsys)  # bare: latest
    assert "resumed from" in err
    resumed_at = json.loads((out / "summary.json").read_text())["resumed_from"]
    assert Path(resumed_at).name >= "step-00000004"
    assert_same_run(out, reference)


def test_sigterm_saves_at_the_step_boundary_and_exits_75(setup, reference, tmp_path, capsys):
    out = tmp_path / "run"
    bg = Background(train_args(setup, out), tmp_path, SFTCTL_FAULT="slow_steps:0.25")
    bg.wait_for(lambda: train_steps_logged(out) >= 5, "step 5")
    bg.p.send_signal(signal.SIGTERM)
    rc = bg.wait()
    log = bg.output()
    assert rc == 75, log[-3000:]
    assert "SIGTERM received" in log and "--resume latest" in log and "Traceback" not in log
    steps = markers(out)
    last = max(steps)
    assert last >= 5 and steps[last]["reason"] in ("SIGTERM", "periodic")
    assert not (out / "model").exists()
    err = resume_in_process(train_args(setup, out, "--resume", "latest"), capsys)
    assert f"resumed from {out / 'checkpoints' / f'step-{last:08d}'}" in err
    assert_same_run(out, reference)


def test_a_second_signal_exits_at_once(setup, tmp_path):
    out = tmp_path / "run"
    bg = Background(train_args(setup, out), tmp_path, SFTCTL_FAULT="slow_steps:2")
    bg.wait_for(lambda: train_steps_logged(out) >= 1, "step 1")
    bg.p.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # both arrive during the 2 s that step 1's boundary takes
    bg.p.send_signal(signal.SIGINT)
    assert bg.wait(timeout=60) == 128 + signal.SIGINT
    log = bg.output()
    assert "SIGTERM received" in log and "second SIGINT: exiting at once" in log
    assert not markers(out)  # no checkpoint was completed for that step


@pytest.mark.parametrize("fault", ["save_before_rename", "save_before_marker"])
def test_a_crash_inside_a_save_resumes_from_the_previous_checkpoint(setup, reference, tmp_path,
                                                                     fault, capsys):
    out = tmp_path / "run"
    r = run(train_args(setup, out), tmp_path, SFTCTL_FAULT=f"{fault}:6")
    assert r.returncode == -signal.SIGKILL
    ck = out / "checkpoints"
    leftover = ".step-00000006.tmp" if fault == "save_before_rename" else "step-00000006"
    assert (ck / leftover).is_dir() and not (ck / leftover / "COMPLETE").exists()
    assert sorted(markers(out)) == [2, 4]
    err = resume_in_process(train_args(setup, out, "--resume"), capsys)
    assert f"resumed from {ck / 'step-00000004'}" in err
    if fault == "save_before_rename":
        assert "removed 1 leftover temporary checkpoint directory" in err
    else:
        assert "step-00000006 is not usable: no completion marker" in err
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------ refusals


def test_resume_refuses_a_different_run(setup, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    rc = cli.main(train_args(setup, out, "--resume", "--lr", "1e-3", "--batch-size", "2",
                             "--quiet"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "optim.lr: 0.003 in the checkpoint, 0.001 now" in err
    assert "train.batch_size: 4 in the checkpoint, 2 now" in err
    assert not (out / "model").exists()


def test_resume_refuses_a_finished_run_and_overwrite(setup, reference, capsys):
    rc = cli.main(train_args(setup, reference, "--resume", "--quiet"))
    assert rc == 2 and "already finished" in capsys.readouterr().err
    rc = cli.main(train_args(setup, reference, "--resume", "--overwrite", "--quiet"))
    assert rc == 2 and "exclude each other" in capsys.readouterr().err


def test_resume_path_picks_its_run_directory_and_missing_paths_are_named(setup, reference,
                                                                         tmp_path, capsys):
    tmp, base, data, val = setup
    rc = cli.main(["train", "--resume", str(tmp_path / "nowhere"), "--model", str(base),
                   "--data", str(data), "--quiet"])
    assert rc == 2 and "nowhere does not exist" in capsys.readouterr().err
    # --resume PATH without --output-dir continues in the checkpoint's run directory
    from sftctl.run.config import build_config
    from sftctl.errors import ConfigError
    from sftctl.training.checkpoint import prepare_resume

    cfg = build_config([("t", {"train": {"resume": str(reference / "checkpoints" /
                                                       "step-00000010")}})])
    with pytest.raises(ConfigError, match="already finished"):
        prepare_resume(cfg)
    assert Path(cfg.train.output_dir) == reference.resolve()
