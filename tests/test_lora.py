"""The built-in ``lora`` plugin (peft adapters) and the model hooks it uses, on real peft and tiny
real transformers models, through the real CLI where a run is involved.

What is checked
- Only adapter parameters train: the default targets are the linear layers of the blocks (never
  the head), the optimizer receives exactly the LoRA tensors, and the backward graph of the
  fused loss reaches no frozen parameter (no weight gradient for the frozen output layer).
- A CLI run writes an adapter that ``PeftModel.from_pretrained`` loads and a merged checkpoint
  that plain transformers loads, giving the same logits; weights outside the adapted layers are
  the base's, bit for bit; summary.json counts trainable vs total parameters; the loss falls.
- rsLoRA and DoRA reach peft and merge exactly.
- ``kill -9`` mid-run then ``--resume`` repeats the uninterrupted run's steps exactly (LoRA
  dropout on, so the RNG state matters), with packing.
- DDP and FSDP2 on 2 gloo processes match one process (losses and merged weights).
- The non-finite guard skips a poisoned step under LoRA.
- Bad input stops before training with the option named: rank 0, targets matching nothing, a
  LoRA resume of a full fine-tune checkpoint and the reverse, 4-bit on the CPU.
- The embedded defaults: embeddings trained in full (tied to the head, one tensor), rank 16
  and lr 5e-3 for ``--plugin alpaca --plugin lora``, which flags override; the alpaca defaults
  untouched without lora and with ``--model``.
- ``--lora-base-dtype``: the frozen base in bf16, adapters fp32; refused with FSDP.
- bitsandbytes: never imported by sftctl on the CPU path (a failing stand-in on the path);
  on CUDA with bitsandbytes, QLoRA trains, saves the adapter and a full-precision merge.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from sftctl.run import cli  # noqa: E402
from sftctl.run.plugin_manager import get_plugin_manager  # noqa: E402

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics,  # noqa: E402
                             write_jsonl)
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

BLOCK_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = build_tiny_base(tmp / "base")
    train = write_jsonl(tmp / "train.jsonl", alpaca_records(21, seed=4))
    val = write_jsonl(tmp / "val.jsonl", alpaca_records(7, seed=9))
    return tmp, base, train, val


def args_for(setup, out, *extra):
    tmp, base, train, val = setup
    return ["train", "--plugin", "lora", "--model", str(base), "--data", str(train),
            "--val-data", str(val), "--output-dir", str(out), "--no-eval", "--lr", "1e-2",
            "--seed", "5", "--eval-every", "3", "--threads", "1", "--device", "cpu", *extra]


def run(tmp, args, timeout=300, torchrun=False, **env):
    cmd = [sys.executable, "-m", "sftctl", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "sftctl", *args]
    return subprocess.run(cmd, env=cli_env(tmp, **env), capture_output=True, text=True,
                          timeout=timeout)


def lora_config(tmp, *flags):
    pm = get_plugin_manager(["lora"], entry_points=False)
    argv = ["train", "--plugin", "lora", "--output-dir", str(tmp / "x"), *flags]
    parser = cli.build_parser(pm, pm.config_options())
    return cli.resolve_config(parser.parse_args(argv), pm, pm.config_options()), pm


def prepared(setup, *flags):
    """The tiny base loaded and prepared by the plugins, as the trainer does."""
    from transformers import AutoModelForCausalLM

    tmp, base = setup[0], setup[1]
    cfg, pm = lora_config(tmp, "--model", str(base), *flags)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return pm.call_chain("sftctl_prepare_model", "model", model=model, config=cfg), model


# ------------------------------------------------------------------------------ in process


def test_only_adapters_train_and_the_frozen_head_gets_no_gradient(setup):
    from sftctl import ops
    from sftctl.training.optim import param_groups

    peft_model, base = prepared(setup, "--lora-r", "4")
    assert sorted(peft_model.peft_config["default"].target_modules) == BLOCK_LINEARS
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    n_layers = base.config.num_hidden_layers
    assert len(trainable) == 2 * len(BLOCK_LINEARS) * n_layers
    groups = param_groups(peft_model.named_parameters(), 0.1)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in peft_model.named_parameters() if p.requires_grad}

    # every parameter the backward of the fused loss reaches is a trainable one: the frozen
    # output layer (tied to the embeddings) and base weights get no gradient computed
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    logits = peft_model(input_ids=ids).logits  # [2, 12, V]
    loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                             inplace_backward=True)
    reached, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            reached.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    assert reached == in_optimizer
    loss.backward()
    head = peft_model.get_output_embeddings().weight
    assert head.grad is None and not head.requires_grad
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_rslora_dora_and_explicit_targets_reach_peft_and_merge_exactly(setup):
    peft_model, _ = prepared(setup, "--lora-r", "4", "--lora-alpha", "8", "--lora-rslora",
                             "--lora-dora", "--lora-target-modules", "q_proj, v_proj")
    cfg = peft_model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and sorted(cfg.target_modules) == ["q_proj", "v_proj"]
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    assert any("lora_magnitude_vector" in n for n, p in peft_model.named_parameters()
               if p.requires_grad)
    with torch.no_grad():  # a non-zero adapter, so the merge has something to add
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 500, (1, 10))
    peft_model.eval()
    want = peft_model(input_ids=ids).logits
    from sftctl.plugins.lora import _merged

    merged = _merged(peft_model, None)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_embedded_defaults_are_lora_only_and_flags_win(tmp_path):
    cfg, _ = lora_config(tmp_path, "--plugin", "alpaca")
    assert cfg.option("lora.r") == 16 and cfg.option("lora.alpha") == 32.0
    assert cfg.option("lora.modules_to_save") == "embed_tokens" and cfg.optim.lr == 5e-3
    cfg, _ = lora_config(tmp_path, "--plugin", "alpaca", "--lr", "3e-3", "--lora-r", "4",
                         "--lora-modules-to-save", "")
    assert cfg.optim.lr == 3e-3 and cfg.option("lora.r") == 4
    assert cfg.option("lora.modules_to_save") == ""
    pm = get_plugin_manager(["alpaca"], entry_points=False)
    parser = cli.build_parser(pm, pm.config_options())
    plain = cli.resolve_config(parser.parse_args(["train", "--plugin", "alpaca", "--output-dir",
                                                  str(tmp_path / "y")]), pm, pm.config_options())
    assert plain.option("lora.r") == 8 and plain.optim.lr == 2e-3  # lora's layer only
    assert plain.option("lora.modules_to_save") is None
    # with --model (a pretrained base) the embedded layer does not apply
    cfg, _ = lora_config(tmp_path, "--plugin", "alpaca", "--model", str(tmp_path))
    assert cfg.option("lora.modules_to_save") is None and cfg.option("lora.r") == 8


def test_saved_tied_embeddings_stay_tied_to_the_head_and_merge_exactly(setup):
    """The embedded default's set-up: the embeddings train in full (modules_to_save) on a model
    whose head is tied to them; peft keeps one trained tensor for both, and the merged model
    is a tied transformers model that gives the adapted model's logits."""
    peft_model, base = prepared(setup, "--lora-r", "4", "--lora-modules-to-save",
                                "embed_tokens")
    assert base.config.tie_word_embeddings
    assert peft_model.peft_config["default"].ensure_weight_tying
    emb = peft_model.get_input_embeddings().modules_to_save["default"].weight
    head = peft_model.get_output_embeddings().modules_to_save["default"].weight
    assert emb is head and emb.requires_grad
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sum("modules_to_save" in n for n in trainable) == 1  # the shared tensor, once
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with torch.no_grad():
        emb.add_(torch.randn_like(emb) * 0.05)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.eval()
    want = peft_model(input_ids=ids).logits
    from sftctl.plugins.lora import _merged

    merged = _merged(peft_model, None)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, emb)
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_base_dtype_holds_the_frozen_base_in_bf16_and_fsdp_is_refused(setup, tmp_path):
    from sftctl import ConfigError

    peft_model, _ = prepared(setup, "--lora-r", "4", "--lora-base-dtype", "bf16")
    dtypes = {(p.requires_grad, p.dtype) for p in peft_model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    ids = torch.randint(0, 500, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in peft_model.parameters() if p.requires_grad)
    # auto on the CPU: fp32 (the default here)
    auto, _ = prepared(setup, "--lora-r", "4")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    cfg, pm = lora_config(tmp_path, "--model", str(setup[1]), "--strategy", "fsdp",
                          "--lora-base-dtype", "bf16")
    with pytest.raises(ConfigError, match="--lora-base-dtype"):
        pm.hook.sftctl_configure.call_historic(kwargs=dict(config=cfg, pm=pm))


def test_a_16_bit_frozen_base_loads_in_16_bit_and_modules_to_save_load_in_fp32(setup, tmp_path):
    """--lora-base-dtype bf16: the plugin's sftctl_model_load_options loads the base in bf16
    (no fp32 copy ever made) and the frozen weights equal, bit for bit, those of the fp32 load
    cast afterwards; the adapters train in fp32. With modules_to_save the base loads in fp32
    (those modules train from the checkpoint's full-precision values)."""
    from sftctl.training.model import load_model, load_tokenizer

    tmp, base = setup[0], setup[1]
    cfg, pm = lora_config(tmp, "--model", str(base), "--lora-r", "4", "--lora-base-dtype",
                          "bf16")
    cpu = torch.device("cpu")
    opts, owners = pm.model_load_options(cfg, cpu)
    assert opts == {"dtype": torch.bfloat16} and owners == {"dtype": "lora"}
    tok = load_tokenizer(str(base), cfg.model)
    direct = load_model(str(base), cfg.model, tok, cpu, load_options=opts)
    assert {p.dtype for p in direct.parameters()} == {torch.bfloat16}
    direct = pm.call_chain("sftctl_prepare_model", "model", model=direct, config=cfg)
    assert {(p.requires_grad, p.dtype) for p in direct.parameters()} == \
        {(False, torch.bfloat16), (True, torch.float32)}
    cast, _ = prepared(setup, "--lora-r", "4", "--lora-base-dtype", "bf16")  # fp32, then cast
    frozen = {n: p for n, p in cast.named_parameters() if not p.requires_grad}
    for n, p in direct.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert len(frozen) == sum(1 for p in direct.parameters() if not p.requires_grad)
    cfg2, pm2 = lora_config(tmp, "--model", str(base), "--lora-base-dtype", "bf16",
                            "--lora-modules-to-save", "embed_tokens")
    assert pm2.model_load_options(cfg2, cpu) == ({}, {})
    cfg3, pm3 = lora_config(tmp, "--model", str(base))  # auto on the CPU: fp32, nothing asked
    assert pm3.model_load_options(cfg3, cpu) == ({}, {})
    # the CLI says where the dtype came from, and trains
    out = tmp_path / "bf16"
    r = run(tmp, args_for(setup, out, "--max-steps", "3", "--batch-size", "4", "--lora-r", "4",
                          "--lora-base-dtype", "bf16"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model load options from plugins: dtype=torch.bfloat16 (plugin 'lora')" in r.stderr
    losses = [x["loss"] for x in read_metrics(out) if x["kind"] == "train"]
    assert len(losses) == 3 and np.isfinite(losses).all()


# ------------------------------------------------------------------------------- CLI runs


@pytest.fixture(scope="module")
def lora_run(setup):
    tmp = setup[0]
    out = tmp / "run"
    r = run(tmp, args_for(setup, out, "--max-steps", "8", "--batch-size", "4", "--lora-r", "4",
                          "--lora-alpha", "8"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_cli_run_writes_adapter_and_merged_model(setup, lora_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, log = lora_run
    base_dir = setup[1]
    s = json.loads((out / "summary.json").read_text())
    p = s["parameters"]
    assert 0 < p["trainable"] < p["total"]
    assert f"{p['total']} parameters ({p['trainable']} trainable)" in log
    assert "lora: r=4 alpha=8" in log and "trainable" in log
    assert s["val_loss"] < s["initial_val_loss"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == BLOCK_LINEARS
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    ids = torch.randint(0, 500, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # the merged checkpoint: the base's tensor names; only adapted layers moved
    m, b = load_file(out / "model" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert sorted(m) == sorted(b)
    for k in b:
        moved = not torch.equal(m[k], b[k])
        assert moved == any(f".{t}." in k for t in BLOCK_LINEARS), k


def test_kill9_then_resume_repeats_the_run_exactly_with_packing(setup, tmp_path):
    tmp = setup[0]
    extra = ["--max-steps", "8", "--batch-size", "2", "--grad-accum", "2", "--packing",
             "--max-seq-len", "128", "--lora-dropout", "0.1", "--save-every", "2"]
    ref = tmp_path / "ref"
    r = run(tmp, args_for(setup, ref, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "killed"
    log = open(tmp_path / "bg.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "sftctl", *args_for(setup, out, *extra)],
                         env=cli_env(tmp, SFTCTL_FAULT="slow_steps:0.3"), stdout=log,
                         stderr=subprocess.STDOUT)
    end = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file():
        assert p.poll() is None and time.monotonic() < end, (tmp_path / "bg.log").read_text()
        time.sleep(0.02)
    p.kill()  # SIGKILL: no cleanup
    p.wait(60)
    log.close()
    assert not (out / "model").exists()
    r = run(tmp, args_for(setup, out, *extra, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr

    def curve(d):
        return [(x["step"], x["loss"], x["grad_norm"]) for x in read_metrics(d)
                if x["kind"] == "train"]

    got, want = curve(out), curve(ref)
    assert [s for s, *_ in got][-1] == 8 and got[-4:] == want[-4:]
    from safetensors.torch import load_file

    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(out / name), load_file(ref / name)
        assert all(torch.equal(a[k], b[k]) for k in b), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(setup, tmp_path, strategy):
    from safetensors.torch import load_file

    tmp = setup[0]
    one = tmp_path / "one"
    r = run(tmp, args_for(setup, one, "--max-steps", "4", "--batch-size", "2", "--grad-accum",
                          "2", "--lora-r", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / strategy
    r = run(tmp, args_for(setup, two, "--max-steps", "4", "--batch-size", "1", "--grad-accum",
                          "2", "--lora-r", "4", "--strategy", strategy), torchrun=True)
    assert r.returncode == 0, r.stderr[-5000:]

    def losses(d):
        return [x["loss"] for x in read_metrics(d) if x["kind"] == "train"]

    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert sorted(a) == sorted(b), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
    s = json.loads((two / "summary.json").read_text())
    assert s["strategy"] == strategy and s["parameters"] == json.loads(
        (one / "summary.json").read_text())["parameters"]


def test_nonfinite_guard_skips_a_poisoned_step(setup, tmp_path):
    tmp = setup[0]
    out = tmp_path / "nan"
    r = run(tmp, args_for(setup, out, "--max-steps", "4", "--batch-size", "4",
                          "--on-nonfinite", "skip"), SFTCTL_FAULT="nan_at_step:2")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["nonfinite_skipped"] == 1 and np.isfinite(s["val_loss"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "model" /
                                                          "model.safetensors").values())


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, expected", [
    (["--lora-r", "0"], "--lora-r"),
    (["--lora-target-modules", "nope_proj"], "--lora-target-modules"),
    (["--lora-modules-to-save", "nope"], "--lora-modules-to-save"),
    (["--lora-load-in-4bit"], "--lora-load-in-4bit"),
])
def test_bad_options_stop_before_training_naming_the_option(setup, tmp_path, flags, expected):
    out = tmp_path / "bad"
    r = run(setup[0], args_for(setup, out, "--max-steps", "2", *flags))
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


def test_resume_across_lora_and_full_fine_tuning_is_refused(setup, tmp_path):
    tmp = setup[0]
    full = tmp_path / "full"
    full_args = [a for a in args_for(setup, full, "--max-steps", "6", "--batch-size", "4",
                                     "--save-every", "2") if a != "lora"]
    full_args.remove("--plugin")
    assert "SFTCTL_FAULT" not in full_args
    # killed while saving step 4: the step-2 checkpoint to resume, an unfinished run
    r = run(tmp, full_args, SFTCTL_FAULT="save_before_rename:4")
    assert (full / "checkpoints" / "step-00000002" / "COMPLETE").is_file(), r.stderr[-2000:]
    r = run(tmp, args_for(setup, full, "--max-steps", "6", "--batch-size", "4", "--save-every",
                          "2", "--resume"))
    assert r.returncode == 2 and "full fine-tune checkpoint" in r.stderr, r.stderr[-2000:]
    assert "train.resume" in r.stderr

    lora = tmp_path / "lora"
    lora_args = args_for(setup, lora, "--max-steps", "6", "--batch-size", "4", "--save-every",
                         "2")
    run(tmp, lora_args, SFTCTL_FAULT="save_before_rename:4")
    assert (lora / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    no_lora = [a for a in lora_args if a != "lora"]
    no_lora.remove("--plugin")
    r = run(tmp, [*no_lora, "--resume"])
    assert r.returncode == 2 and "is a LoRA checkpoint" in r.stderr, r.stderr[-2000:]


def test_compile_and_chat_format_train_with_adapters(setup, tmp_path):
    """--compile gives the eager run's losses; the chat format (template tokens added, so the
    embeddings are resized before the adapter wraps the model) trains and merges."""
    tmp = setup[0]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for out, extra in ((eager, []), (compiled, ["--compile"])):
        r = run(tmp, args_for(setup, out, "--max-steps", "2", "--batch-size", "4", *extra),
                timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    loss = [[x["loss"] for x in read_metrics(d) if x["kind"] == "train"]
            for d in (eager, compiled)]
    np.testing.assert_allclose(loss[1], loss[0], rtol=1e-4)
    assert json.loads((compiled / "summary.json").read_text())["compiled"]

    chats = [{"messages": [{"role": "user", "content": r["instruction"] + " " + r["input"]},
                           {"role": "assistant", "content": r["output"]}]}
             for r in alpaca_records(12, seed=2)]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    out = tmp_path / "chat"
    r = run(tmp, ["train", "--plugin", "chat", "--plugin", "lora", "--model", str(setup[1]),
                  "--data", str(data), "--chat-template", "chatml", "--output-dir", str(out),
                  "--no-eval", "--max-steps", "2", "--batch-size", "4", "--threads", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_added"] > 0 and 0 < s["parameters"]["trainable"] < s["parameters"]["total"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert merged.get_input_embeddings().weight.shape[0] == len(
        AutoTokenizer.from_pretrained(out / "model"))


# ------------------------------------------------------------------------ QLoRA, bitsandbytes

# a stand-in bitsandbytes: importing it leaves a mark (even where the ImportError is caught)
TRIPWIRE = ("import os\n"
            "open(os.environ['SFTCTL_TEST_BNB_MARK'], 'w').write('imported')\n"
            "raise ImportError('tripwire: bitsandbytes was imported')\n")


def test_the_cpu_path_never_imports_bitsandbytes(setup, tmp_path):
    """With a bitsandbytes on the path that fails when imported: sftctl's CLI, the plugin's
    checks and the 4-bit refusal on the CPU never import it (the error names the option and
    the CUDA requirement). peft itself imports bitsandbytes while it builds LoRA layers
    whenever the package is installed; that is peft's doing, not sftctl's, and not tested."""
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(TRIPWIRE)
    mark = tmp_path / "bnb_imported"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"),
                                          os.environ.get("PYTHONPATH", "")]),
           "SFTCTL_TEST_BNB_MARK": str(mark)}
    out = tmp_path / "cpu4bit"
    r = run(setup[0], args_for(setup, out, "--max-steps", "2", "--lora-load-in-4bit"), **env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--lora-load-in-4bit" in r.stderr and "CUDA" in r.stderr
    assert "tripwire" not in r.stderr and "Traceback" not in r.stderr and not mark.exists()
    assert not (out / "metrics.jsonl").exists()
    # in process: the CLI, the config layering and the plugin's configure hook, for a CPU LoRA
    # run: bitsandbytes is found on the path but never imported
    code = (
        "import sys, importlib.util\n"
        "assert importlib.util.find_spec('bitsandbytes') is not None\n"
        "from sftctl.run import cli\n"
        "from sftctl.run.plugin_manager import get_plugin_manager\n"
        "pm = get_plugin_manager(['lora'], entry_points=False)\n"
        "parser = cli.build_parser(pm, pm.config_options())\n"
        f"argv = ['train', '--plugin', 'lora', '--model', {str(setup[1])!r}, '--device', "
        f"'cpu', '--output-dir', {str(tmp_path / 'x')!r}]\n"
        "cfg = cli.resolve_config(parser.parse_args(argv), pm, pm.config_options())\n"
        "pm.hook.sftctl_configure.call_historic(kwargs=dict(config=cfg, pm=pm))\n"
        "print('bitsandbytes' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(setup[0], **env),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and not mark.exists()


_HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_on_cuda_loads_the_frozen_base_in_bf16_and_trains(setup, tmp_path):
    """On the GPU with bf16 (--lora-base-dtype auto): the base loads straight in bf16 onto the
    GPU (no fp32 copy), the adapters train in fp32, the run compiles (auto) and learns."""
    tmp, base_dir, train, val = setup
    out = tmp_path / "bf16"
    r = run(tmp, ["train", "--plugin", "lora", "--model", str(base_dir), "--data", str(train),
                  "--val-data", str(val), "--output-dir", str(out), "--no-eval", "--lr", "1e-2",
                  "--seed", "5", "--device", "cuda", "--precision", "bf16", "--max-steps", "10",
                  "--batch-size", "4", "--lora-r", "8", "--lora-alpha", "16"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "model load options from plugins: dtype=torch.bfloat16 (plugin 'lora')" in r.stderr
    assert "frozen base weights held in bfloat16" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["compiled"] and s["val_loss"] < s["initial_val_loss"]


@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_BNB),
                    reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_4bit_on_cuda_trains_saves_and_loads(setup, tmp_path):
    """--lora-load-in-4bit on the GPU: the base reloads 4-bit NF4, the loss falls, the adapter
    loads with PeftModel.from_pretrained on the full-precision base, and the merged checkpoint
    (adapter merged into the full-precision base, not the NF4 weights) is a plain transformers
    model giving the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, base_dir, train, val = setup
    out = tmp_path / "qlora"
    r = run(tmp, ["train", "--plugin", "lora", "--model", str(base_dir), "--data", str(train),
                  "--val-data", str(val), "--output-dir", str(out), "--no-eval", "--lr", "1e-2",
                  "--seed", "5", "--device", "cuda", "--precision", "bf16", "--max-steps", "10",
                  "--batch-size", "4", "--lora-r", "8", "--lora-alpha", "16",
                  "--lora-load-in-4bit"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "4-bit NF4" in r.stderr
    # loaded 4-bit straight away (no fp32 load first)
    assert "model load options from plugins: quantization_config=BitsAndBytesConfig " \
        "(plugin 'lora')" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["val_loss"] < s["initial_val_loss"]
    losses = [x["loss"] for x in read_metrics(out) if x["kind"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in cfg
    m, b = load_file(out / "model" / "model.safetensors"), load_file(base_dir /
                                                                     "model.safetensors")
    assert sorted(m) == sorted(b) and all(m[k].shape == b[k].shape for k in b)
    ids = torch.randint(0, 500, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
