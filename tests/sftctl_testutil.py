"""Helpers shared by the trainer/CLI/plugin/data tests: a tiny real HF model, JSONL files, and a
subprocess runner for the real ``sftctl`` CLI.

The tiny model is the project's own Llama config shrunk further, with the project's BPE tokenizer
trained on a few hundred demo records: built in about a second, saved and loaded through the
ordinary ``save_pretrained`` / ``from_pretrained`` path (no download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_installed_plugins(monkeypatch):
    """Installed third-party plugins and test fault injection stay out of a test module that
    imports this fixture (the plugin tests opt in to entry points themselves)."""
    monkeypatch.setenv("SFTCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SFTCTL_PLUGINS", raising=False)
    monkeypatch.delenv("SFTCTL_FAULT", raising=False)


def tiny_alpaca_setup(tmp_path_factory, name: str, n: int = 24, seed: int = 31):
    """(folder, tiny base model, JSONL of ``n`` alpaca records) for a module's CLI runs."""
    tmp = tmp_path_factory.mktemp(name)
    base = build_tiny_base(tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", alpaca_records(n, seed=seed))
    return tmp, base, data

TINY_OVERRIDES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}


def build_tiny_base(out_dir: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    from sftctl.plugins.alpaca import demo_data, demo_model

    tok = demo_model.build_tokenizer(demo_data.generate(300, seed=11), vocab_size=vocab_size)
    model = demo_model.build_model(tok, seed=seed, overrides=TINY_OVERRIDES)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def alpaca_records(n: int, seed: int = 3) -> list[dict]:
    from sftctl.plugins.alpaca import demo_data

    return [{k: r[k] for k in ("instruction", "input", "output")}
            for r in demo_data.generate(n, seed=seed)]


def write_jsonl(path: Path, records, raw_lines: dict[int, str] | None = None) -> Path:
    """Write records as JSON Lines; ``raw_lines`` replaces line i (0-based) by a raw string."""
    path = Path(path)
    lines = [json.dumps(r) for r in records]
    for i, raw in (raw_lines or {}).items():
        lines[i] = raw
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_env(tmp_path: Path | None = None, **extra) -> dict:
    """Environment for CLI subprocesses: offline, one thread (the CI box has 2 shared cores),
    no third-party plugin autoload (tests opt in), private datasets cache."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "SFTCTL_DISABLE_PLUGIN_AUTOLOAD": "1", "TOKENIZERS_PARALLELISM": "false"})
    if tmp_path is not None:
        env["HF_DATASETS_CACHE"] = str(Path(tmp_path) / "hf_datasets_cache")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftctl", *args], env=env or cli_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def plain_val_loss(model_dir, records, *, uncapped: bool = False) -> float:
    """Token-mean cross-entropy of the response tokens (+ EOS) of alpaca ``records`` under the
    model in ``model_dir``, one example at a time with ``F.cross_entropy`` on the model's logits:
    an independent reference for the trainer's validation loss (no sftctl code on the path but
    the prompt template). ``uncapped``: use the ``lm_head`` output, before any logit cap that
    the model applies after it (Gemma-2's final_logit_softcapping)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftctl.plugins.alpaca.demo_data import format_prompt

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    head = []
    model.lm_head.register_forward_hook(lambda mod, args, out: head.append(out))
    total, count = 0.0, 0
    for rec in records:
        prompt = tok(format_prompt(rec), add_special_tokens=False).input_ids
        response = tok(rec["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])  # [1, T]
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # [1, T, V]
        if uncapped:
            logits = head[-1]
        # position t predicts token t + 1; only the response tokens are targets
        pred = logits[0, len(prompt) - 1:-1].float()  # [R, V]
        total += float(F.cross_entropy(pred, ids[0, len(prompt):], reduction="sum"))
        count += len(response)
    return total / count


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
