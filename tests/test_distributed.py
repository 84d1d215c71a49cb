"""Distributed training on torchrun: DDP and FSDP2 runs of 2 CPU processes (gloo) against one
process with the same global batch.

What is checked
- Per-step training losses (and validation losses) of ``torchrun --nproc_per_node 2 -m sftctl
  train --batch-size b`` equal those of one process with ``--batch-size 2b`` within 1e-5
  relative: the loss is normalized by the global trainable-token count and the data-parallel
  gradient average is cancelled. Padded batches with gradient accumulation (DDP, FSDP) and packed
  rows (FSDP; the batch plan does not depend on the strategy) are covered; 21 training examples
  leave one row for the last padded micro-batch, so the second rank gets a masked filler row
  there (no example is dropped).
- The final checkpoints (a consolidated HF safetensors directory; FSDP gathers its shards) reload
  with ``from_pretrained`` and hold the same weights as the single-process run (fp32 tolerance),
  stored the same way (tied embeddings once).
- Only rank 0 logs and writes files; the summary counts the tokens of every rank.
- Resuming a step-3 checkpoint on 2 ranks (FSDP: torch.distributed.checkpoint shards) repeats
  the uninterrupted run exactly; resuming it on another world size is refused clearly.
- The batch plan uses every example exactly once per epoch for any world size.

On GPUs with 2 devices the same comparison runs with NCCL (skipped elsewhere). Children run with
one thread each (the CI machine has 2 cores); the whole file takes 1-2 minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sftctl.data import BatchPlan, FillerRow
from sftctl.training.distributed import select_strategy
from sftctl.errors import ConfigError

from sftctl_testutil import alpaca_records, build_tiny_base, cli_env, read_metrics, write_jsonl
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

RTOL = 1e-5
# fp32 weights after a few AdamW steps differ only by the summation order of the gradients; Adam
# scales each coordinate's step to about lr, so a near-zero gradient component can carry a
# rounding difference into a visible one (seen: 3.5e-6 on 1 of 16k entries; lr is 2e-3). All
# but a handful of entries must agree to 1e-6.
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base = build_tiny_base(tmp / "base")
    train = write_jsonl(tmp / "train.jsonl", alpaca_records(21, seed=4))
    val = write_jsonl(tmp / "val.jsonl", alpaca_records(7, seed=9))
    return tmp, base, train, val


def common_args(base, train, val, out, *extra):
    return ["train", "--model", str(base), "--data", str(train), "--val-data", str(val),
            "--output-dir", str(out), "--no-eval", "--lr", "2e-3", "--seed", "5",
            "--eval-every", "3", "--loss-impl", "fused", *extra]


def run_single(tmp, args, extra_env=None):
    r = subprocess.run([sys.executable, "-m", "sftctl", *args],
                       env=cli_env(tmp, **(extra_env or {})), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_torchrun(tmp, args, nproc=2, extra_env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", "sftctl", *args]
    r = subprocess.run(cmd, env=cli_env(tmp, **(extra_env or {})), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    return r


def curves(run_dir: Path):
    m = read_metrics(run_dir)
    train = [(x["step"], x["loss"]) for x in m if x["kind"] == "train"]
    val = [(x["step"], x["val_loss"]) for x in m if x["kind"] == "val"]
    return train, val


def assert_same_curves(single: Path, dist: Path):
    (ts, vs), (td, vd) = curves(single), curves(dist)
    assert [s for s, _ in ts] == [s for s, _ in td] and len(ts) >= 3
    np.testing.assert_allclose([l for _, l in td], [l for _, l in ts], rtol=RTOL)
    assert [s for s, _ in vs] == [s for s, _ in vd] and len(vs) >= 2
    np.testing.assert_allclose([l for _, l in vd], [l for _, l in vs], rtol=RTOL)


def assert_same_checkpoint(single: Path, dist: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a = load_file(single / "model" / "model.safetensors")
    b = load_file(dist / "model" / "model.safetensors")
    assert sorted(a) == sorted(b)  # same tensors stored (a tie is stored once in both)
    loose = 0
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
        loose += int(((b[k] - a[k]).abs() > 1e-6).sum())
    assert loose <= 1e-4 * sum(t.numel() for t in a.values()), loose
    ma = AutoModelForCausalLM.from_pretrained(single / "model", dtype=torch.float32)
    mb = AutoModelForCausalLM.from_pretrained(dist / "model", dtype=torch.float32)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    # the trained weights moved away from the base (the comparison is not vacuous)
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((single / "summary.json").read_text())["base_model"], dtype=torch.float32)
    moved = max(float((sa[k] - v).abs().max()) for k, v in base.state_dict().items())
    assert moved > 1e-3


def check_summary(single: Path, dist: Path, strategy: str):
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((dist / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["strategy"] == strategy
    assert s2["steps"] == s1["steps"] and s2["tokens"] == s1["tokens"]
    assert s2["examples"] == s1["examples"]
    # the tied head: one process adds the embedding rows into the head's gradient in place,
    # DDP/FSDP keep autograd's dense gradient (their hooks need it whole); the curves and
    # checkpoints of the two paths agree (assert_same_curves / assert_same_checkpoint)
    assert s1["loss_head"]["tied"] is True
    assert s1["loss_head"]["embedding_grad"] == "into the head's gradient"
    assert s2["loss_head"]["embedding_grad"] == (
        f"autograd's dense gradient: strategy {strategy} (its gradient hooks need the whole "
        "gradient from autograd)")
    # one metrics line per step: only rank 0 writes
    assert len(read_metrics(dist)) == len(read_metrics(single))


def padded_runs(setup, strategy):
    """One process with batch 2 and 2 ranks with batch 1 (x 2 accumulation, 6 steps); the
    distributed run saves a resumable checkpoint at step 3. Run once per module."""
    tmp, base, train, val = setup
    single = tmp / "single_padded"
    if not single.exists():
        run_single(tmp, common_args(base, train, val, single, "--batch-size", "2",
                                    "--grad-accum", "2", "--quiet"))
    out = tmp / f"{strategy}_padded"
    log = tmp / f"{strategy}_padded.stderr"
    if not log.exists():
        r = run_torchrun(tmp, common_args(base, train, val, out, "--batch-size", "1",
                                          "--grad-accum", "2", "--strategy", strategy,
                                          "--save-every", "3"))
        log.write_text(r.stderr)
    return single, out, log.read_text()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_padded_batches_with_accumulation_match_one_process(setup, strategy):
    single, out, stderr = padded_runs(setup, strategy)
    assert_same_curves(single, out)
    assert_same_checkpoint(single, out)
    check_summary(single, out, strategy)
    # rank 0 alone logs (the other rank only reports errors)
    assert stderr.count("sftctl: done:") == 1 and stderr.count("sftctl: run directory") == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_with_the_same_world_size_continues_exactly(setup, strategy):
    """Resuming the step-3 checkpoint (FSDP: torch.distributed.checkpoint shards) on 2 ranks
    repeats steps 4-6 of the uninterrupted run bit for bit (the CPU is deterministic)."""
    tmp, base, train, val = setup
    _, full, _ = padded_runs(setup, strategy)
    ckpt = full / "checkpoints" / "step-00000003"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "sharded" / ".metadata").is_file() == (strategy == "fsdp")
    out = tmp / f"{strategy}_resumed"
    run_torchrun(tmp, common_args(base, train, val, out, "--batch-size", "1", "--grad-accum",
                                  "2", "--strategy", strategy, "--resume", str(ckpt), "--quiet"))
    assert curves(out) == curves(full)  # restored history + steps 4-6: exactly equal
    from safetensors.torch import load_file

    a = load_file(full / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_world_size_is_refused(setup, capsys):
    """A 2-rank checkpoint does not continue on 1 process: the data plan and the position in
    it are those of 2 ranks (and FSDP's shards those of 2 ranks): a clear error, nothing runs."""
    from sftctl.run import cli

    tmp, base, train, val = setup
    for strategy in ("ddp", "fsdp"):
        _, full, _ = padded_runs(setup, strategy)
        out = tmp / f"{strategy}_resumed_on_one"
        rc = cli.main(common_args(base, train, val, out, "--batch-size", "1", "--grad-accum",
                                  "2", "--resume", str(full / "checkpoints" / "step-00000003"),
                                  "--quiet"))
        err = capsys.readouterr().err
        # ddp: the trainer's world-size check; fsdp: the sharded-state check of the checkpointer
        assert rc != 0 and re.search(r"(world size 2|state of 2 ranks).* 1\b", err), err
        assert not (out / "model").exists()


@pytest.mark.parametrize("strategy", ["fsdp"])  # the plan is the strategy's; one keeps CI short
def test_packed_rows_match_one_process(setup, strategy):
    tmp, base, train, val = setup
    single = tmp / "single_packed"
    pack = ["--packing", "--max-seq-len", "96", "--quiet"]
    if not single.exists():
        run_single(tmp, common_args(base, train, val, single, "--batch-size", "2", *pack))
    out = tmp / f"{strategy}_packed"
    run_torchrun(tmp, common_args(base, train, val, out, "--batch-size", "1", "--strategy",
                                  strategy, *pack))
    assert_same_curves(single, out)
    assert_same_checkpoint(single, out)
    check_summary(single, out, strategy)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_nccl_match_one_gpu(setup, strategy):
    tmp, base, train, val = setup
    fp32 = ["--precision", "fp32", "--device", "cuda", "--quiet"]
    no_tf32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # true fp32 matmuls on both sides
    single = tmp / "single_gpu"
    if not single.exists():
        run_single(tmp, common_args(base, train, val, single, "--batch-size", "2",
                                    "--grad-accum", "2", *fp32), extra_env=no_tf32)
    out = tmp / f"{strategy}_gpu"
    run_torchrun(tmp, common_args(base, train, val, out, "--batch-size", "1", "--grad-accum",
                                  "2", "--strategy", strategy, *fp32),
                 extra_env=no_tf32)
    assert_same_curves(single, out)
    assert_same_checkpoint(single, out)


# ----------------------------------------------------------------------- in-process, no launch


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_example_once_per_epoch_and_steps_agree(packing, world):
    lengths = np.random.default_rng(1).integers(5, 60, size=23)
    one = BatchPlan(lengths, 2 * world, 128, packing, seed=7)
    plans = [BatchPlan(lengths, 2, 128, packing, seed=7, world_size=world, rank=r)
             for r in range(world)]
    for epoch in (0, 1):
        per_rank = [p.batches(epoch) for p in plans]
        # every rank runs the same number of micro-batches (collectives stay in step)
        assert len({len(b) for b in per_rank}) == 1
        assert all(p.num_batches(epoch) == len(per_rank[0]) for p in plans)
        assert len(per_rank[0]) == len(one.batches(epoch))
        seen = []
        for k, want in enumerate(one.batches(epoch)):
            rows = [row for rank in range(world) for row in per_rank[rank][k]]
            real = [row for row in rows if not isinstance(row, FillerRow)]
            assert real == want  # step k sees the single process's examples, in order
            assert all(len(per_rank[rank][k]) >= 1 for rank in range(world))
            seen += [i for row in real for i in row]
        assert sorted(seen) == list(range(len(lengths)))


def test_filler_rows_add_no_target_example_or_token(tmp_path):
    from transformers import AutoTokenizer

    from sftctl.data import Source, collate, tokenize_split
    from sftctl.run.plugin_manager import get_plugin_manager
    import datasets

    base = build_tiny_base(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    fmt = get_plugin_manager(entry_points=False).dataset_formats()["alpaca"]
    split = tokenize_split("train", [(Source("mem", "demo"),
                                      datasets.Dataset.from_list(alpaca_records(3)))], fmt, tok,
                           max_seq_len=256, train_on_prompt=False, skip_invalid=False,
                           num_proc=1, quiet=True)
    real = collate(split, [[0], [1]], pad_id=tok.pad_token_id, packing=False)
    mixed = collate(split, [[0], FillerRow([1])], pad_id=tok.pad_token_id, packing=False)
    assert torch.equal(mixed.input_ids, real.input_ids)
    assert int(mixed.loss_mask[1].sum()) == 0 and int(real.loss_mask[1].sum()) > 0
    assert torch.equal(mixed.loss_mask[0], real.loss_mask[0])
    assert mixed.num_examples == 1 and mixed.num_tokens == int(real.attention_mask[0].sum())


class _Cfg:
    class train:
        strategy = "auto"
        device = "cpu"


def test_strategy_selection_and_clear_errors(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    cfg = _Cfg()
    assert select_strategy(cfg).name == "none"  # auto, one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, "
                                          r"MASTER_PORT not set: launch .* with torchrun"):
        select_strategy(cfg)  # auto -> ddp, but not launched by torchrun
    cfg.train.strategy = "none"
    with pytest.raises(ConfigError, match="--strategy none"):
        select_strategy(cfg)
    cfg.train.strategy = "fsdp"
    cfg.train.device = "cuda:1"
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost"), monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="each rank uses cuda:LOCAL_RANK"):
        select_strategy(cfg)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE='x' is not an integer"):
        select_strategy(cfg)
