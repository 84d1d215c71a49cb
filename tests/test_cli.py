"""The real ``sftctl`` CLI: the golden-loss curve of the embedded default run, fused vs torch at
the CLI level, packing, the checkpoint layout, --help, config layering and every bad-input case.

Subprocess runs use one thread and the offline environment (see ``sftctl_testutil.cli_env``).
Regenerate the stored curves with ``SFTCTL_REGEN_GOLDEN=1 pytest tests/test_cli.py -k golden``
(refused when CI is set: CI compares, it never rewrites). Each golden file records the torch,
transformers and Python versions and the CPU kernel ISA it was made with. The goldens are also
anchored outside themselves: the untrained model's loss is about ln(V), and the logged validation
losses of the base and of the checkpoint equal a plain ``F.cross_entropy`` over the held-out
responses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from sftctl.run import cli
from sftctl.run.config import iter_fields

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, plain_val_loss,
                             read_metrics, run_cli, write_jsonl)
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_YAML = GOLDEN / "alpaca_golden.yaml"
REGEN = os.environ.get("SFTCTL_REGEN_GOLDEN") == "1"
RTOL = 2e-4  # thread count and kernel ISA may change fp32 rounding; the curve must not move



def curve(run_dir: Path) -> dict:
    m = read_metrics(run_dir)
    return {"train_loss": [x["loss"] for x in m if x["kind"] == "train"],
            "val_loss": [[x["step"], x["val_loss"]] for x in m if x["kind"] == "val"]}


def environment() -> dict:
    """What a golden curve depends on besides the code: library versions and the CPU ISA the
    extension's kernels dispatch to."""
    import platform

    import torch
    import transformers

    import sftctl

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu_capability": sftctl.extension_info()["cpu_capability"]}


def check_golden(name: str, got: dict) -> None:
    path = GOLDEN / f"{name}.json"
    if REGEN:
        if os.environ.get("CI"):
            pytest.fail("SFTCTL_REGEN_GOLDEN=1 with CI set: CI compares against the goldens and "
                        "never rewrites them; regenerate on a development machine")
        path.write_text(json.dumps({"made_with": environment(), **got}, indent=1) + "\n")
        pytest.skip(f"regenerated {path}")
    want = json.loads(path.read_text())
    # a mismatch names both environments: a new torch or ISA explains a drift, code does not
    where = f"golden made with {want['made_with']}, this run: {environment()}"
    assert len(got["train_loss"]) == len(want["train_loss"]), where
    np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=RTOL, err_msg=where)
    assert [s for s, _ in got["val_loss"]] == [s for s, _ in want["val_loss"]], where
    np.testing.assert_allclose([v for _, v in got["val_loss"]], [v for _, v in want["val_loss"]],
                               rtol=RTOL, err_msg=where)


def golden_heldout() -> list[dict]:
    """The validation records of the golden run (alpaca.demo_* options of GOLDEN_YAML)."""
    from sftctl.plugins.alpaca.demo_data import default_splits

    opts = yaml.safe_load(GOLDEN_YAML.read_text())["options"]
    return default_splits(seed=opts["alpaca.demo_seed"], n_train=opts["alpaca.demo_train_size"],
                          n_heldout=opts["alpaca.demo_heldout_size"])[1]


# The untrained embedded model's next-token distribution is near uniform: its logits are RMS-
# normed hidden states times a tied embedding drawn with std 0.02 (hidden size 96: a spread of
# ~0.2), so the cross-entropy is ln(V) plus a small excess, second order in that spread (seen:
# +0.04 to +0.05 with V = 1013). A wrong normalizer or token count moves it far more.
UNIFORM_ATOL = 0.1


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """``sftctl train --plugin alpaca`` on the embedded base (built into OUT/base)."""
    tmp = tmp_path_factory.mktemp("golden")
    out = tmp / "run"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--output-dir", str(out)],
                env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_golden_default_run_curve_and_checkpoint(golden_run):
    out, r = golden_run
    check_golden("alpaca_tiny_fused", curve(out))
    # the run directory of docs/contracts.md §2
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model", "base"):
        assert (out / name).exists(), name
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "sftctl_config.yaml", "sftctl_summary.json"):
        assert (model_dir / name).is_file(), name
    assert not list(out.glob(".model.tmp-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 12
    assert summary["examples"] == {"used": 400, "truncated": 0, "dropped": 0, "skipped": 0}
    assert summary["base_model"] == str((out / "base").resolve())
    assert summary["loss_kernel"].startswith("sftctl._C")
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["peak_memory_bytes"] > 0
    assert [b["name"] for b in summary["benchmarks"]] == ["alpaca_exact_match", "alpaca_choice"]
    assert summary["val_loss"] < summary["initial_val_loss"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 2e-3 and cfg["plugins"] == ["alpaca"]
    lines = read_metrics(out)
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 13))
    for key in ("step", "epoch", "loss", "lr", "tokens", "tokens_total", "tokens_per_s",
                "grad_norm", "time"):
        assert key in train[0]
    # it reloads as a plain HF model and gives the logged validation loss
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(out / "base")
    assert model.config.vocab_size == len(tok)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                        ref.state_dict().values()))
    assert changed
    val = curve(out)["val_loss"]
    heldout = golden_heldout()
    assert val[0][1] == pytest.approx(plain_val_loss(out / "base", heldout), rel=1e-5)
    assert val[-1][1] == pytest.approx(plain_val_loss(model_dir, heldout), rel=1e-5)


def test_golden_curves_start_at_the_uniform_loss():
    """Independent of every stored number: the untrained model's first training loss and first
    validation loss are ln(V) within UNIFORM_ATOL, in every golden file."""
    import math

    from sftctl.plugins.alpaca import demo_model

    tok = demo_model.build_tokenizer()  # the embedded base's tokenizer: V = len(tok)
    uniform = math.log(len(tok))
    for name in ("alpaca_tiny_fused", "alpaca_tiny_packed"):
        want = json.loads((GOLDEN / f"{name}.json").read_text())
        assert set(want["made_with"]) == {"torch", "transformers", "python", "cpu_capability"}
        assert want["train_loss"][0] == pytest.approx(uniform, abs=UNIFORM_ATOL), name
        assert want["val_loss"][0] == [0, pytest.approx(uniform, abs=UNIFORM_ATOL)], name
        # and training leaves it: the goldens are not flat lines near ln(V)
        assert want["val_loss"][-1][1] < uniform - 1.0, name


def test_golden_curve_with_the_torch_loss(golden_run, tmp_path):
    """The plain PyTorch path reproduces the fused run's curve (same base, same config)."""
    out0, _ = golden_run
    out = tmp_path / "torch"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--model", str(out0 / "base"),
                 "--output-dir", str(out), "--loss-impl", "torch"], env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = curve(out), curve(out0)
    np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=RTOL)
    assert json.loads((out / "summary.json").read_text())["loss_kernel"].startswith("torch")


def test_golden_packed_run(golden_run, tmp_path):
    out0, _ = golden_run
    out = tmp_path / "packed"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--model", str(out0 / "base"),
                 "--output-dir", str(out), "--packing", "--batch-size", "2"],
                env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    check_golden("alpaca_tiny_packed", curve(out))
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["packing"] is True and s["steps"] == 12
    assert s["examples"]["used"] == 400
    # packing changes the layout, not the loss of the same examples: the untrained model's
    # validation loss (packed rows here, padded rows there) is the padded run's
    padded = curve(out0)["val_loss"][0]
    assert curve(out)["val_loss"][0] == [0, pytest.approx(padded[1], rel=1e-6)]
    # first-fit packing of ~28-token examples fills each step's 2 x 2 rows of 256 positions
    # (seen: 87-100%), so a step carries more than twice the real tokens of a padded step of
    # 16 examples (~440)
    for x in read_metrics(out):
        if x["kind"] == "train":
            assert x["tokens"] >= 0.8 * 4 * 256, x
    assert s["tokens"] > 2 * json.loads((out0 / "summary.json").read_text())["tokens"]



_CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
RTOL_CUDA = 1e-3  # fp32 on the GPU: other reduction orders (cuBLAS, the kernels' row split)


@_CUDA
def test_golden_curve_on_cuda_fp32(golden_run, tmp_path):
    """The CUDA kernels inside the real trainer: an fp32 GPU run of the golden config follows the
    CPU golden curve, with the sftctl kernels (no fallback) and a GPU memory reading."""
    out0, _ = golden_run
    out = tmp_path / "cuda"
    r = run_cli(["train", "--config", str(GOLDEN_YAML), "--model", str(out0 / "base"),
                 "--output-dir", str(out), "--device", "cuda", "--no-compile"],
                env=cli_env(tmp_path, NVIDIA_TF32_OVERRIDE=0))
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = curve(out), json.loads((GOLDEN / "alpaca_tiny_fused.json").read_text())
    np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=RTOL_CUDA)
    np.testing.assert_allclose([v for _, v in got["val_loss"]],
                               [v for _, v in want["val_loss"]], rtol=RTOL_CUDA)
    s = json.loads((out / "summary.json").read_text())
    assert s["loss_kernel"] == "sftctl._C linear_cross_entropy + sft_labels (cuda)"
    assert s["fallbacks"] == [] and s["device"].startswith("cuda")
    assert s["peak_memory_kind"] == "cuda_max_allocated" and s["peak_memory_bytes"] > 0


@_CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_fused_loss_matches_the_torch_loss(golden_run, tmp_path,
                                                                precision):
    """bf16/fp16 autocast on the GPU (fp16 with the GradScaler): the fused fp32 loss and the
    PyTorch fp32 reference train the same curve; the only difference is the loss kernel."""
    out0, _ = golden_run
    curves = {}
    for impl in ("fused", "torch"):
        out = tmp_path / impl
        r = run_cli(["train", "--config", str(GOLDEN_YAML), "--model", str(out0 / "base"),
                     "--output-dir", str(out), "--device", "cuda", "--precision", precision,
                     "--loss-impl", impl], env=cli_env(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        curves[impl] = curve(out)
        assert json.loads((out / "summary.json").read_text())["precision"] == precision
    fused, ref = curves["fused"]["train_loss"], curves["torch"]["train_loss"]
    assert fused[0] == pytest.approx(ref[0], rel=1e-5)  # same weights and batch: only the loss
    np.testing.assert_allclose(fused, ref, rtol=1e-2)  # low-precision matmuls amplify ulps
    assert fused[-1] < 0.8 * fused[0]


def test_help_documents_every_option():
    r = run_cli(["train", "--help"])
    assert r.returncode == 0
    for dotted, f, _ in iter_fields():
        flag = f.metadata.get("flag")
        if flag:
            assert flag in r.stdout, flag
    for flag in ("--output-dir", "--max-steps", "--epochs", "--batch-size", "--grad-accum", "--lr",
                 "--max-seq-len", "--seed", "--packing", "--precision", "--skip-invalid",
                 "--no-eval", "--loss-impl", "--quiet", "--plugin", "--config", "--model",
                 "--data", "--alpaca-demo-train-size"):
        assert flag in r.stdout, flag


# ------------------------------------------------------------------------ config resolution


def resolved(argv, capsys) -> dict:
    assert cli.main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_config_layers_yaml_then_flags(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("optim:\n  lr: 1e-4\n  scheduler: linear\ntrain:\n  batch_size: 3\n"
                 "options:\n  alpaca.demo_seed: 5\n")
    cfg = resolved(["--model", "x/y", "--config", str(y), "--batch-size", "5",
                    "--set", "optim.betas=[0.8, 0.9]", "--alpaca-demo-train-size", "7"], capsys)
    assert cfg["optim"]["lr"] == 1e-4  # YAML 1.1 reads 1e-4 as a string: accepted as a number
    assert cfg["optim"]["scheduler"] == "linear"
    assert cfg["train"]["batch_size"] == 5  # the flag wins over the file
    assert cfg["optim"]["betas"] == [0.8, 0.9]
    assert cfg["options"]["alpaca.demo_seed"] == 5 and cfg["options"]["alpaca.demo_train_size"] == 7
    assert cfg["data"]["format"] == "alpaca"
    assert cfg["train"]["output_dir"].startswith("runs")


def test_embedded_model_gets_the_formats_tuned_defaults(capsys):
    from sftctl.run.plugin_manager import get_plugin_manager

    fmt = get_plugin_manager(entry_points=False).dataset_formats()["alpaca"]
    if fmt.demo_config is None:
        pytest.skip("no tuned defaults file shipped")
    tuned = yaml.safe_load(Path(fmt.demo_config).read_text())
    cfg = resolved(["--plugin", "alpaca"], capsys)
    for section, values in tuned.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert cfg[section][k] == v or float(cfg[section][k]) == float(v), (section, k)
    # with --model the tuned defaults of the tiny model are not applied
    cfg2 = resolved(["--plugin", "alpaca", "--model", "org/name"], capsys)
    assert cfg2["optim"]["lr"] == 2e-5


@pytest.mark.parametrize("argv, message", [
    (["--set", "optim.lrr=1"], "unknown key 'lrr' (did you mean 'lr'?)"),
    (["--set", "train.batch_size=eight"], "train.batch_size: expected an integer"),
    (["--set", "train.batch_size=0"], "below the minimum"),
    (["--set", "nosection.x=1"], "unknown key 'nosection'"),
    (["--set", "options.nope=1"], "unknown key 'nope'"),
    (["--set", "optim.betas=[0.9]"], "optim.betas"),
    (["--plugin", "nope"], "unknown plugin 'nope'; available: alpaca"),
    (["--config", "/nonexistent/run.yaml"], "config file not found"),
])
def test_config_errors_are_named(argv, message, capsys):
    rc = cli.main(["train", *argv, "--print-config"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_config_file_typo_names_the_file(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  max_step: 3\n")
    assert cli.main(["train", "--config", str(y), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert str(y) in err and "max_step" in err and "max_steps" in err


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny"))


GOOD = {"instruction": "Reverse the words.", "input": "red blue", "output": "blue red"}


def train_on(tmp_path, tiny, data: Path, *extra) -> tuple[int, Path]:
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(tiny), "--data", str(data), "--output-dir", str(out),
                   "--max-steps", "2", "--no-eval", "--quiet", "--no-initial-eval", *extra])
    return rc, out


def assert_no_checkpoint(out: Path):
    assert not (out / "model").exists() and not (out / "summary.json").exists()


BAD_CASES = {
    "missing_field": ([GOOD, {"instruction": "x", "input": ""}, GOOD], None,
                      ["record 1 (line 2)", "'output'", "missing"]),
    "mistyped_field": ([GOOD, GOOD, {**GOOD, "output": 5}], None,
                       ["record 2 (line 3)", "'output'", "expected a string, got int"]),
    "mistyped_everywhere": ([{**GOOD, "instruction": ["a"]}] * 2, None,
                            ["record 0 (line 1)", "'instruction'", "got list"]),
    "empty_response": ([GOOD, {**GOOD, "output": "   "}], None,
                       ["record 1 (line 2)", "'output'", "empty response"]),
    "invalid_json_line": ([GOOD, GOOD, GOOD], {1: '{"instruction": "x", '},
                          ["line 2", "invalid JSON"]),
    "not_an_object": ([GOOD, GOOD], {1: "[1, 2]"}, ["line 2", "expected a JSON object"]),
    "wrong_columns": ([{"prompt": "a", "completion": "b"}], None,
                      ["record 0", "missing field 'instruction'", "columns ['prompt', "]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_stop_before_training(case, tmp_path, tiny, capsys):
    records, raw, needles = BAD_CASES[case]
    data = write_jsonl(tmp_path / f"{case}.jsonl", records, raw)
    rc, out = train_on(tmp_path, tiny, data)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(data) in err
    for n in needles:
        assert n in err, (n, err)
    assert_no_checkpoint(out)


def test_empty_dataset(tmp_path, tiny, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    rc, out = train_on(tmp_path, tiny, data)
    assert rc == 2 and "empty dataset" in capsys.readouterr().err
    assert_no_checkpoint(out)


def test_missing_data_file_and_model_path(tmp_path, tiny, capsys):
    rc, out = train_on(tmp_path, tiny, tmp_path / "nope.jsonl")
    assert rc == 2 and "data file not found" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    out = tmp_path / "o2"
    rc = cli.main(["train", "--model", str(tmp_path / "no_model"), "--data", str(data),
                   "--output-dir", str(out), "--quiet"])
    assert rc == 2 and "model path not found" in capsys.readouterr().err
    assert_no_checkpoint(out)


def test_skip_invalid_counts_what_it_skipped(tmp_path, tiny):
    good = alpaca_records(10)
    recs = good[:4] + [{"instruction": "x"}] + good[4:8] + [{**GOOD, "output": 3}] + good[8:]
    data = write_jsonl(tmp_path / "d.jsonl", recs + [GOOD], {len(recs): "{broken"})
    rc, out = train_on(tmp_path, tiny, data, "--skip-invalid")
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["examples"]["skipped"] == 3 and s["examples"]["used"] == 10
    msgs = s["examples_detail"]["train"]["skipped_messages"]
    assert any("line 13" in m and "invalid JSON" in m for m in msgs), msgs
    assert (out / "model" / "model.safetensors").is_file()


def test_truncation_and_drops_are_counted(tmp_path, tiny):
    long = {**GOOD, "input": " ".join(["blue"] * 400)}  # the response falls past max_seq_len
    recs = alpaca_records(6) + [long, {**GOOD, "output": "red " * 200}]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    rc, out = train_on(tmp_path, tiny, data, "--max-seq-len", "200")
    assert rc == 0
    ex = json.loads((out / "summary.json").read_text())["examples"]
    assert ex == {"used": 7, "truncated": 1, "dropped": 1, "skipped": 0}


def test_sequences_longer_than_the_models_positions_are_refused(tmp_path, tiny, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(8))
    rc, out = train_on(tmp_path, tiny, data, "--packing", "--max-seq-len", "512")
    assert rc == 2 and "supports 256 positions" in capsys.readouterr().err
    assert_no_checkpoint(out)


def test_output_dir_with_a_run_is_refused_without_overwrite(tmp_path, tiny, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(8))
    assert train_on(tmp_path, tiny, data)[0] == 0
    rc, _ = train_on(tmp_path, tiny, data)
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert train_on(tmp_path, tiny, data, "--overwrite")[0] == 0


def test_exit_code_of_the_real_process(tmp_path, tiny):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "output": ""}])
    r = run_cli(["train", "--model", str(tiny), "--data", str(data), "--output-dir",
                 str(tmp_path / "o"), "--quiet"], env=cli_env(tmp_path))
    assert r.returncode == 2
    assert "record 1 (line 2): field 'output': empty response" in r.stderr
    assert "Traceback" not in r.stderr


def test_non_finite_loss_stops_without_a_checkpoint(tmp_path, tiny, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(8))
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(broken), "--data", str(data), "--output-dir",
                   str(out), "--max-steps", "2", "--no-eval", "--quiet", "--no-initial-eval"])
    assert rc == 1
    assert "step 1: non-finite loss" in capsys.readouterr().err
    assert_no_checkpoint(out)


def test_torchrun_world_size_is_refused_clearly(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(8))
    rc, out = train_on(tmp_path, tiny, data)
    assert rc == 2 and "WORLD_SIZE=2" in capsys.readouterr().err


# ------------------------------------------------------------------------ plugins and doctor


def test_plugins_json_lists_builtins(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {p["name"]: p for p in info["plugins"]}
    assert {"alpaca", "optimizers", "schedulers", "metrics_jsonl"} <= set(names)
    assert names["alpaca"]["dataset_formats"] == ["alpaca"]
    assert {"adamw", "sgd"} <= set(names["optimizers"]["optimizers"])
    assert set(names["schedulers"]["schedulers"]) == {"cosine", "linear", "constant"}


def test_doctor_reports_the_extension_and_device(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["extension"]["loaded"] is True
    assert "CPU" in rep["extension"]["kernels"]["cross_entropy"]
    assert rep["device"]["selected"] in ("cpu", "cuda")
    assert rep["versions"]["torch"]
