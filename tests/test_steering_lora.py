"""``--benchmark-every`` with ``--plugin lora``: each benchmarked step's model is the base with the
adapters merged, a standard checkpoint, computed without touching the training weights
(``sftctl.plugins.lora.merged_copy``), on real peft and a tiny real transformers model.

- In process: ``merged_copy`` equals peft's own ``merge_and_unload`` on a deep copy, per
  element, for plain LoRA, rsLoRA + DoRA, and trained tied embeddings (``modules_to_save``);
  the live model's weights, config and merge state are unchanged.
- Real CLI: a LoRA run with ``--benchmark-every 2`` has the losses, gradient norms, final adapter
  and merged model of the same run without it, bit for bit; the step-2 model directory loads
  with plain transformers and equals the step-2 checkpoint's peft model merged by peft.
- DDP on 2 gloo ranks: the step-2 model equals the one-process run's.
- FSDP is still refused before training.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics,  # noqa: E402
                             write_jsonl)
from sftctl_testutil import no_installed_plugins  # noqa: F401,E402 (autouse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steering_lora")
    base = build_tiny_base(tmp / "base")
    train = write_jsonl(tmp / "train.jsonl", alpaca_records(24, seed=4))
    held = write_jsonl(tmp / "held.jsonl", alpaca_records(3, seed=9))
    return tmp, base, train, held


def _prepared(tmp, base, *flags, on: str = "cpu"):
    from transformers import AutoModelForCausalLM

    from sftctl.run import cli
    from sftctl.run.plugin_manager import get_plugin_manager

    pm = get_plugin_manager(["lora"], entry_points=False)
    parser = cli.build_parser(pm, pm.config_options())
    cfg = cli.resolve_config(parser.parse_args(
        ["train", "--plugin", "lora", "--model", str(base), "--output-dir", str(tmp / "x"),
         *flags]), pm, pm.config_options())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(on)
    return pm.call_chain("sftctl_prepare_model", "model", model=model, config=cfg), cfg


@pytest.mark.parametrize("flags", [
    ["--lora-r", "4"],
    ["--lora-r", "4", "--lora-alpha", "8", "--lora-rslora", "--lora-dora",
     "--lora-target-modules", "q_proj,v_proj,down_proj"],
    ["--lora-r", "4", "--lora-modules-to-save", "embed_tokens"],
], ids=["lora", "rslora_dora", "tied_modules_to_save"])
def test_merged_copy_equals_peft_merge_and_leaves_the_live_model_alone(setup, flags):
    from sftctl.plugins.lora import merged_copy

    tmp, base = setup[0], setup[1]
    live, cfg = _prepared(tmp, base, *flags)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters (B, DoRA magnitudes, saved embeddings)
        for n, p in live.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    before = {k: v.detach().clone() for k, v in live.state_dict().items()}
    config_before = live.config.to_dict()

    merged = merged_copy(live, cfg)

    # the live model: same weights bit for bit, same config, nothing merged into it
    after = live.state_dict()
    assert sorted(after) == sorted(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert live.config.to_dict() == config_before
    assert not any(getattr(m, "merged", False) for m in live.modules())
    # peft's own merge of a deep copy (the reference the plugin must match), per element
    want = copy.deepcopy(live).merge_and_unload().state_dict()
    got = merged.state_dict()
    assert type(merged).__name__ == "LlamaForCausalLM" and sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1.3e-6, atol=1e-6, msg=k)
    q = "model.layers.0.self_attn.q_proj.weight"  # adapted in every case: the merge moved it
    assert not torch.equal(got[q], before[f"base_model.model.{q[:-7]}.base_layer.weight"])
    if "--lora-modules-to-save" in flags:  # the trained embeddings, still tied to the head
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        trained = next(v for k, v in before.items()
                       if "embed_tokens.modules_to_save" in k)
        assert torch.equal(got["model.embed_tokens.weight"], trained)
    # the logits of the merged copy are the live peft model's
    ids = torch.randint(0, 500, (1, 9), generator=g)
    live.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, live(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# the real CLI, except that the step model directories (deleted after their benchmark) are kept
# so the test can read them
KEEP_STEPS = ("import sys\nimport sftctl.evals.steering as s\ns._prune = lambda *a, **k: None\n"
              "from sftctl.run import cli\nsys.exit(cli.main(sys.argv[1:]))\n")
STEERED = ["--benchmark-every", "2", "--benchmark-limit", "2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merged_copy_on_cuda_with_a_bf16_base_uses_no_device_memory(setup):
    """On a GPU (--lora-base-dtype auto: the frozen base in bf16, adapters fp32): the merged
    copy is built on the CPU (no tensor of it on the device, no device memory kept), equals
    peft's merge of a deep copy, and the live model is unchanged."""
    from transformers import AutoModelForCausalLM

    from sftctl.plugins.lora import merged_copy

    tmp, base = setup[0], setup[1]
    live, cfg = _prepared(tmp, base, "--lora-r", "4", "--lora-modules-to-save", "embed_tokens",
                          "--device", "cuda", "--precision", "bf16", on="cuda")
    dtypes = {p.dtype for n, p in live.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}, dtypes  # the frozen base was cast by the plugin
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n, p in live.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, device="cuda") * 0.05)
    before = {k: v.detach().clone() for k, v in live.state_dict().items()}
    torch.cuda.synchronize()
    mem = torch.cuda.memory_allocated()
    merged = merged_copy(live, cfg)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == mem  # nothing of the copy lives on the device
    assert {t.device.type for t in [*merged.parameters(), *merged.buffers()]} == {"cpu"}
    after = live.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    want = {k: v.cpu() for k, v in copy.deepcopy(live).merge_and_unload().state_dict().items()}
    got = merged.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:  # the same bf16 rounding on either device up to one bf16 ulp
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-3,
                                   msg=k)


def _train(setup, out: Path, *extra, keep_steps: bool = False, ranks: int = 1,
           batch_size: int = 4):
    import subprocess

    tmp, base, train, held = setup
    args = ["train", "--plugin", "lora", "--model", str(base), "--data", str(train),
            "--output-dir", str(out), "--max-steps", "4", "--batch-size", str(batch_size),
            "--lr", "2e-2", "--seed", "5", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-rslora", "--lora-modules-to-save", "embed_tokens", "--keep-last", "0",
            "--threads", "1", "--device", "cpu", *extra]
    script = tmp / "keep_steps.py"
    script.write_text(KEEP_STEPS)
    cmd = [sys.executable, str(script)] if keep_steps else [sys.executable, "-m", "sftctl"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(ranks), *(cmd[1:] if keep_steps else ["-m", "sftctl"])]
    return subprocess.run([*cmd, *args], env=cli_env(tmp), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def steered(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("steered_one") / "run"
    r = _train(setup, out, "--heldout", str(setup[3]), *STEERED, keep_steps=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "step 2: benchmarked" in r.stderr
    return out


def test_lora_benchmark_every_cli(setup, steered, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sftctl.training.checkpoint import load_weights

    tmp, base, train, held = setup
    plain = tmp_path / "plain"
    r2 = _train(setup, plain, "--no-eval", "--save-every", "2")
    assert r2.returncode == 0, r2.stderr[-4000:]

    # 1. training unchanged: losses and gradient norms, the final adapter and merged model
    def curve(d):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(d)
                if m["kind"] == "train"]

    assert curve(steered) == curve(plain) and len(curve(plain)) == 4
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(steered / name), load_file(plain / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name

    # 2. the step's scores were recorded
    points = json.loads((steered / "summary.json").read_text())["steering"]["points"]
    assert [(p["step"], p["model"]) for p in points] == [(2, "checkpoint"), (4, "final")]
    assert all(p["errors"] == {} and p["scores"]["heldout_nll"]["nll_per_token"] > 0
               for p in points)

    # 3. the step-2 model: a plain transformers checkpoint equal to the live peft model of
    # step 2 (the resumable checkpoint holds its state dict) merged by peft
    step_dir = steered / "eval" / "steps" / "step-00000002" / "model"
    got_model = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32)
    assert type(got_model).__name__ == "LlamaForCausalLM"
    adapter_cfg = json.loads((steered / "adapter" / "adapter_config.json").read_text())
    ref_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lcfg = LoraConfig(**{k: adapter_cfg[k] for k in (
        "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
        "use_dora", "bias", "task_type") if k in adapter_cfg},
        **({"ensure_weight_tying": True} if adapter_cfg.get("ensure_weight_tying") else {}))
    assert lcfg.use_rslora
    ref = get_peft_model(ref_base, lcfg)
    ckpt = load_weights(steered / "checkpoints" / "step-00000002" / "model.safetensors")
    ref.load_state_dict(ckpt, strict=True)
    want = ref.merge_and_unload().state_dict()
    got = got_model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1.3e-6, atol=1e-6, msg=k)
    # it is step 2's model: not the base, not the final one
    final = load_file(steered / "model" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    base_w = load_file(base / "model.safetensors")  # (ref_base itself was merged in place)
    assert not torch.equal(got[q], base_w[q]) and not torch.equal(got[q], final[q])


def test_lora_benchmark_every_under_ddp(setup, steered, tmp_path):
    """Two gloo ranks (rank 0 benchmarks, rank 1 waits): the step-2 model equals the one-process
    run's (the global batch is the same: 2 rows on each of 2 ranks)."""
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    r = _train(setup, out, "--heldout", str(setup[3]), *STEERED, "--strategy", "ddp",
               keep_steps=True, ranks=2, batch_size=2)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "step 2: benchmarked" in r.stderr
    name = "eval/steps/step-00000002/model/model.safetensors"
    a, b = load_file(steered / name), load_file(out / name)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
    assert json.loads((out / "summary.json").read_text())["strategy"] == "ddp"


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes")
                    is None, reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_benchmark_every_on_cuda(setup, tmp_path):
    """--lora-load-in-4bit with --benchmark-every: the step model is the adapter merged into the
    full-precision base (the final save's route), a plain fp32 checkpoint: the base's tensor
    names and shapes, no quantization_config, only the adapted layers moved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    r = _train(setup, out, "--heldout", str(setup[3]), *STEERED, "--lora-load-in-4bit",
               "--lora-modules-to-save", "", "--device", "cuda", "--precision", "bf16",
               keep_steps=True)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "step 2: benchmarked" in r.stderr
    step_dir = out / "eval" / "steps" / "step-00000002" / "model"
    cfg = json.loads((step_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    m, b = load_file(step_dir / "model.safetensors"), load_file(setup[1] / "model.safetensors")
    assert sorted(m) == sorted(b)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for k in b:
        assert m[k].dtype == torch.float32 and m[k].shape == b[k].shape, k
        assert (not torch.equal(m[k], b[k])) == any(f".{t}." in k for t in targets), k
    model = AutoModelForCausalLM.from_pretrained(step_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 500, (1, 8))).logits).all()
    points = json.loads((out / "summary.json").read_text())["steering"]["points"]
    assert [p["step"] for p in points] == [2, 4] and all(p["errors"] == {} for p in points)


def test_fsdp_is_still_refused():
    from sftctl.errors import ConfigError
    from sftctl.evals import steering
    from sftctl.run.config import RunConfig

    cfg = RunConfig()
    cfg.plugins = ["lora"]
    cfg.eval.benchmark_every = 2
    steering.configure(cfg, pm=None)  # one process / DDP: accepted
    cfg.train.strategy = "fsdp"
    with pytest.raises(ConfigError, match="--benchmark-every with --strategy fsdp is not "
                                          "supported"):
        steering.configure(cfg, pm=None)
