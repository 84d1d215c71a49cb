"""TRL/Axolotl names in --config files and `sftctl config import` (real config layering and
the real CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftctl_testutil import cli_env, run_cli  # noqa: E402

from sftctl import ConfigError
from sftctl.run.config import build_config, run_layers
from sftctl.run.plugin_manager import get_plugin_manager


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(entry_points=False)


def resolve(pm, file_layer, cli=None):
    layers = run_layers(cli or {}, file_layer, "run.yaml", pm)
    return build_config(layers, pm.config_options())


TRL = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "learning_rate": 2e-4,
       "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
       "num_train_epochs": 2.0, "max_length": 512, "warmup_ratio": 0.1, "weight_decay": 0.01,
       "lr_scheduler_type": "constant_with_warmup", "output_dir": "out/x", "seed": 7,
       "bf16": True, "gradient_checkpointing": True, "max_steps": -1, "logging_steps": 5,
       "save_steps": 100, "eval_steps": 50, "report_to": "none", "max_grad_norm": 0.5,
       "optim": "adamw_torch_fused", "packing": True}


def test_trl_keys(pm, caplog):
    caplog.set_level("INFO", logger="sftctl")
    logger = __import__("logging").getLogger("sftctl")
    logger.propagate, old = True, logger.propagate
    try:
        cfg = resolve(pm, dict(TRL))
    finally:
        logger.propagate = old
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B" and cfg.optim.lr == 2e-4
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (4, 8, 2)
    assert cfg.data.max_seq_len == 512 and cfg.optim.warmup_ratio == 0.1
    assert cfg.optim.scheduler == "constant" and cfg.optim.name == "adamw"
    assert cfg.train.precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.train.max_steps is None and cfg.train.log_every == 5
    assert (cfg.train.save_every, cfg.eval.every) == (100, 50)
    assert cfg.train.report_to == [] and cfg.optim.grad_clip == 0.5 and cfg.data.packing
    notice = " ".join(r.getMessage() for r in caplog.records)
    assert "learning_rate -> optim.lr" in notice and "max_length -> data.max_seq_len" in notice


def test_axolotl_keys(pm):
    cfg = resolve(pm, {"base_model": "m", "sequence_len": 256, "micro_batch_size": 2,
                       "num_epochs": 3, "datasets": [{"path": "a.jsonl", "type": "alpaca"},
                                                     {"path": "b.jsonl", "type": "alpaca"}],
                       "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
                       "lora_target_modules": ["q_proj", "v_proj"], "val_set_size": 0.05,
                       "wandb_project": "p", "bf16": False, "fp16": False,
                       "train_on_inputs": False})
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.data.format == "alpaca"
    assert cfg.plugins == ["alpaca", "lora"] and cfg.option("lora.r") == 16
    assert cfg.option("lora.target_modules") == "q_proj,v_proj"
    assert cfg.option("wandb.project") == "p" and cfg.train.precision == "fp32"
    assert cfg.data.val_fraction == 0.05 and cfg.train.batch_size == 2


@pytest.mark.parametrize("layer, message", [
    ({"learning_rate": 1e-4, "optim": {"lr": 2e-4}},
     "learning_rate (an alias of optim.lr) and optim.lr are both given"),
    ({"micro_batch_size": 2, "per_device_train_batch_size": 4},
     "micro_batch_size and per_device_train_batch_size both set train.batch_size"),
    ({"num_train_epochs": 2.5}, "num_train_epochs: 2.5 epochs: sftctl trains whole epochs"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type: 'polynomial' has no sftctl"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
    ({"deepspeed": "ds.json"}, "deepspeed: a TRL/Axolotl option with no sftctl equivalent"),
    ({"learning_rte": 1e-4}, "unknown key 'learning_rte'"),
])
def test_errors_name_the_keys(pm, layer, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        resolve(pm, layer)


def test_cli_flag_still_wins(pm):
    cfg = resolve(pm, {"learning_rate": 1e-4}, {"optim": {"lr": 3e-4}})
    assert cfg.optim.lr == 3e-4


def test_config_import_cli(tmp_path):
    src = tmp_path / "axolotl.yaml"
    src.write_text(yaml.safe_dump({"base_model": "m", "learning_rate": 1e-4,
                                   "micro_batch_size": 2, "deepspeed": "ds.json",
                                   "flux_capacitor": 1}))
    out = tmp_path / "run.yaml"
    r = run_cli(["config", "import", str(src), "-o", str(out)], env=cli_env(tmp_path))
    assert r.returncode == 1, r.stderr  # something was not mapped
    assert "not mapped: deepspeed" in r.stderr and "not mapped: flux_capacitor" in r.stderr
    data = yaml.safe_load(out.read_text())
    assert data == {"model": {"name_or_path": "m"}, "optim": {"lr": 1e-4},
                    "train": {"batch_size": 2}}
    assert "#   learning_rate -> optim.lr" in out.read_text()
    r = run_cli(["train", "--config", str(out), "--print-config"], env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["optim"]["lr"] == 1e-4
