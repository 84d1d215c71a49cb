"""Trainer internals on a real (tiny) HF Llama: packing equivalence, fused-vs-torch loss and
gradients, normalization over gradient accumulation, label semantics, schedules, batch plans."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftctl import hookimpl, ops
from sftctl.run import cli
from sftctl.data import BatchPlan, collate, pack_first_fit, tokenize_split, Source
from sftctl.training.loss import IGNORE_INDEX, sft_labels, token_loss, torch_sft_labels
from sftctl.run.plugin_manager import get_plugin_manager
from sftctl.plugins.schedulers import lr_factor

from sftctl_testutil import alpaca_records, build_tiny_base, read_metrics, write_jsonl
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def tok(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_model(base, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=attn)
    m.config.use_cache = False
    return m


@pytest.fixture(scope="module")
def split(tok):
    import datasets

    pm = get_plugin_manager(entry_points=False)
    fmt = pm.dataset_formats()["alpaca"]
    recs = alpaca_records(12, seed=5)
    ds = datasets.Dataset.from_list(recs)
    return tokenize_split("train", [(Source("mem", "demo"), ds)], fmt, tok, max_seq_len=256,
                          train_on_prompt=False, skip_invalid=False, num_proc=1, quiet=True)


def per_doc_loss_sums(model, batch, impl="torch"):
    """Sum of token losses per document (keyed by (row, document)) and the labels used."""
    labels, _ = sft_labels(batch, impl)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits  # [B, T, V]
    tl = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)  # [B, T]
    return tl, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_unpacked_per_document_loss(base, tok, split, attn):
    model = load_model(base, attn)
    docs = [0, 1, 2, 3]
    padded = collate(split, [[i] for i in docs], pad_id=tok.pad_token_id, packing=False)
    packed = collate(split, [docs[:3], docs[3:]], pad_id=tok.pad_token_id, packing=True)
    assert packed.attention_mask is None and packed.position_ids is not None
    tl_pad, lab_pad = per_doc_loss_sums(model, padded)
    tl_pack, lab_pack = per_doc_loss_sums(model, packed)
    unpacked = [float(tl_pad[b].sum()) for b in range(len(docs))]
    got = []
    for row in range(packed.input_ids.shape[0]):
        d = packed.document_ids[row]
        for k in range(int(d.max()) + 1):
            got.append(float(tl_pack[row][d == k].sum()))
    assert np.allclose(got, unpacked, rtol=1e-5, atol=1e-5), (got, unpacked)
    # the same number of targets, and no target crosses a document boundary
    assert int((lab_pack != IGNORE_INDEX).sum()) == int((lab_pad != IGNORE_INDEX).sum())

    # sensitivity: without the position-id reset, attention crosses documents and losses change
    leaky = collate(split, [docs[:3]], pad_id=tok.pad_token_id, packing=True)
    n = leaky.input_ids.shape[1]
    leaky.position_ids = torch.arange(n).unsqueeze(0)
    tl_leak, _ = per_doc_loss_sums(model, leaky)
    d = leaky.document_ids[0]
    assert not math.isclose(float(tl_leak[0][d == 1].sum()), unpacked[1], rel_tol=1e-4)


def test_packed_and_padded_gradients_match(base, tok, split):
    docs = list(range(6))
    grads = []
    for packing in (False, True):
        model = load_model(base)
        rows = [[i] for i in docs] if packing is False else pack_first_fit(
            docs, split.lengths, 256)
        b = collate(split, rows, pad_id=tok.pad_token_id, packing=packing)
        labels, n = sft_labels(b, "fused")
        loss = token_loss(model(**b.model_inputs()).logits, labels, n.float(), "fused")
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_fused_and_torch_give_the_same_labels_loss_and_gradients(base, tok, split):
    for packing in (False, True):
        rows = [[0, 1], [2], [3, 4]] if packing else [[0], [1], [2]]
        b = collate(split, rows, pad_id=tok.pad_token_id, packing=packing)
        lab_f, n_f = sft_labels(b, "fused")
        lab_t, n_t = sft_labels(b, "torch")
        assert torch.equal(lab_f, lab_t) and int(n_f) == int(n_t) > 0
        out = {}
        for impl in ("fused", "torch"):
            model = load_model(base)
            logits = model(**b.model_inputs()).logits
            norm = torch.tensor(float(n_t) + 7.0)  # a step-wide count larger than this batch's
            loss = token_loss(logits, lab_t, norm, impl, consume_logits=impl == "fused")
            loss.backward()
            out[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        assert torch.allclose(out["fused"][0], out["torch"][0], rtol=1e-6, atol=1e-6)
        for gf, gt in zip(out["fused"][1], out["torch"][1]):
            assert torch.allclose(gf, gt, rtol=1e-4, atol=1e-7)


def test_accumulated_micro_batches_equal_one_big_batch(base, tok, split):
    """sum over micro-batches of (token-loss sum / step count) == token mean of the union."""
    pad = tok.pad_token_id
    model = load_model(base)
    micro = [collate(split, [[0], [1]], pad_id=pad, packing=False),
             collate(split, [[2], [3], [4]], pad_id=pad, packing=False)]
    labels = [sft_labels(b, "fused") for b in micro]
    norm = sum(n for _, n in labels).float()
    total = 0.0
    for b, (lab, _) in zip(micro, labels):
        loss = token_loss(model(**b.model_inputs()).logits, lab, norm, "fused")
        loss.backward()
        total += float(loss.detach())
    g_acc = torch.cat([p.grad.flatten() for p in model.parameters()])
    model2 = load_model(base)
    big = collate(split, [[i] for i in range(5)], pad_id=pad, packing=False)
    lab, n = sft_labels(big, "fused")
    loss = token_loss(model2(**big.model_inputs()).logits, lab, n.float(), "fused")
    loss.backward()
    g_big = torch.cat([p.grad.flatten() for p in model2.parameters()])
    assert math.isclose(total, float(loss.detach()), rel_tol=1e-5)
    assert torch.allclose(g_acc, g_big, atol=1e-6, rtol=1e-4)
    # and a mean of per-batch means would be different here
    with torch.no_grad():
        means = [float(token_loss(model(**b.model_inputs()).logits, lab_, None, "torch",
                                  reduction="sum")) / int(n_)
                 for b, (lab_, n_) in zip(micro, labels)]
    assert not math.isclose(sum(means) / 2, float(loss.detach()), rel_tol=1e-4)


def test_torch_label_reference_matches_the_op_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 3, 17
        ids = torch.randint(0, 50, (B, T), generator=g)
        lm = torch.randint(0, 2, (B, T), generator=g)
        am = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).long()
        pos = torch.stack([torch.cat([torch.arange(k), torch.arange(T - k)])
                           for k in torch.randint(1, T, (B,), generator=g).tolist()])
        docs = (pos == 0).long().cumsum(-1)
        for kw in (dict(loss_mask=lm, attention_mask=am), dict(loss_mask=lm, position_ids=pos),
                   dict(loss_mask=lm, position_ids=pos, document_ids=docs), dict()):
            a, na = torch_sft_labels(ids, **kw)
            b, nb = ops.sft_labels(ids, **kw)
            assert torch.equal(a, b) and int(na) == int(nb)


def test_schedules_warm_up_then_decay():
    f = lambda kind, s: lr_factor(s, kind=kind, total=10, warmup=2, min_ratio=0.1)
    assert [f("constant", s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    for kind in ("cosine", "linear"):
        vals = [f(kind, s) for s in range(10)]
        assert vals[0] == 0.5 and vals[2] == 1.0
        assert all(a >= b for a, b in zip(vals[2:], vals[3:]))
        assert math.isclose(vals[-1], 0.1)


def test_batch_plan_is_deterministic_and_shards_by_rank():
    lengths = np.random.default_rng(0).integers(5, 60, size=53)
    one = BatchPlan(lengths, 4, 128, False, seed=3)
    assert one.batches(0) == one.batches(0) and one.batches(0) != one.batches(1)
    assert sorted(i for b in one.batches(0) for r in b for i in r) == list(range(53))
    two = [BatchPlan(lengths, 2, 128, False, seed=3, world_size=2, rank=r) for r in (0, 1)]
    # the rows of step k on both ranks are the rows of step k on one process with batch 4
    for k, b in enumerate(one.batches(0)[:-1]):
        assert two[0].batches(0)[k] + two[1].batches(0)[k] == b
    packed = BatchPlan(lengths, 2, 128, True, seed=3)
    rows = [r for b in packed.batches(0) for r in b]
    assert sorted(i for r in rows for i in r) == list(range(53))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) < 53  # it packs


def test_grad_accum_run_equals_big_batch_run(base, tmp_path):
    """Two CLI runs: batch 4 x accum 1 and batch 2 x accum 2 give the same per-step losses."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(24))
    losses = []
    for bs, acc in ((4, 1), (2, 2)):
        out = tmp_path / f"run_{bs}_{acc}"
        rc = cli.main(["train", "--model", str(base), "--data", str(data), "--output-dir",
                       str(out), "--batch-size", str(bs), "--grad-accum", str(acc),
                       "--max-steps", "4", "--lr", "1e-3", "--no-eval", "--quiet",
                       "--no-initial-eval"])
        assert rc == 0
        losses.append([m["loss"] for m in read_metrics(out) if m["kind"] == "train"])
    assert len(losses[0]) == 4
    assert np.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses


@pytest.mark.parametrize("extra", [
    ["--precision", "bf16"], ["--precision", "fp16"], ["--gradient-checkpointing"],
    ["--optimizer", "sgd", "--lr", "0.1"], ["--optimizer", "adafactor"],
    ["--optimizer", "adam", "--scheduler", "linear", "--warmup-ratio", "0.5"],
    ["--packing", "--max-seq-len", "256", "--batch-size", "2", "--scheduler", "constant",
     "--eval-every", "2", "--val-fraction", "0.2"],  # --eval-every needs a validation set
    ["--epochs", "2", "--val-fraction", "0.2"],
])
def test_training_options_reach_a_complete_checkpoint(base, tmp_path, extra):
    from sftctl.training.atomic import checkpoint_complete

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(20))
    out = tmp_path / "run"
    args = ["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
            "--batch-size", "4", "--lr", "1e-3", "--no-eval", "--quiet", *extra]
    if "--epochs" not in extra:
        args += ["--max-steps", "3"]
    assert cli.main(args) == 0
    m = read_metrics(out)
    losses = [x["loss"] for x in m if x["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert checkpoint_complete(out / "model")
    if "--epochs" in extra:  # 16 training examples / batch 4 = 4 steps per epoch
        assert len(losses) == 8 and m[-1]["kind"] == "val"


def test_state_dict_round_trip_continues_the_run_exactly(base, tmp_path):
    """The seam for exact resume: stop after 2 steps, save the trainer state through
    torch.save / torch.load(weights_only=True), restore it into a fresh trainer: steps 3-5 equal
    the uninterrupted run's."""
    import io

    from sftctl.run.config import build_config
    from sftctl.training.trainer import Trainer

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(40))
    pm = get_plugin_manager(entry_points=False)

    def trainer(name):
        cfg = build_config([("t", {
            "model": {"name_or_path": str(base)}, "data": {"paths": [str(data)]},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"output_dir": str(tmp_path / name), "max_steps": 5, "batch_size": 3,
                      "grad_accum": 2, "quiet": True},
            "eval": {"initial": False}})], pm.config_options())
        t = Trainer(cfg, pm)
        t.setup()
        return t

    full = trainer("full")
    full.train()
    want = [h["loss"] for h in full.state.history if h["kind"] == "train"]

    first = trainer("first")

    class StopAt2:
        @hookimpl
        def sftctl_step_end(self, run, step):
            if step == 2:
                run.request_stop("test")

    pm.add_plugin(StopAt2(), "stop_at_2")
    try:
        first.train()
    finally:
        pm.unregister(name="stop_at_2")
        pm.infos.pop("stop_at_2")
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    torch.manual_seed(999)  # the restored RNG state must win over whatever ran in between
    second = trainer("second")
    second.load_state_dict(sd)
    second.train()
    got = [h["loss"] for h in second.state.history if h["kind"] == "train"]
    assert got[:2] == want[:2]
    assert got[2:] == want[2:]  # bitwise: same data position, optimizer, schedule, RNG


def test_resolve_impl_falls_back_only_without_kernels():
    from sftctl.training.loss import resolve_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_impl("fused", cpu, lambda d: True) == ("fused", None)
    assert resolve_impl("torch", cuda, lambda d: False) == ("torch", None)
    impl, why = resolve_impl("fused", cuda, lambda d: d == "cpu")
    assert impl == "torch" and "sftctl._C has no CUDA kernels" in why


def test_the_extension_reports_its_own_kernels():
    from sftctl._ext import has_kernel

    assert has_kernel("cpu")
    assert has_kernel("cuda") == torch._C._dispatch_has_kernel_for_dispatch_key(
        "sftctl::cross_entropy", "CUDA")
    assert not has_kernel("mps")


def test_a_missing_kernel_is_a_counted_fallback_not_silent(base, tmp_path, monkeypatch, capsys):
    """An extension without kernels for the run's device (here: the CPU kernels declared
    missing) trains through the PyTorch loss, says so in the log and in summary.json, and gives
    the same curve as asking for the PyTorch loss."""
    import json

    import sftctl._ext as ext

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(16))
    common = ["--model", str(base), "--data", str(data), "--batch-size", "4", "--max-steps",
              "3", "--lr", "1e-3", "--no-eval", "--no-initial-eval", "--device", "cpu"]
    assert cli.main(["train", *common, "--output-dir", str(tmp_path / "ref"), "--quiet",
                     "--loss-impl", "torch"]) == 0
    monkeypatch.setattr(ext, "has_kernel", lambda device_type: False)
    capsys.readouterr()
    assert cli.main(["train", *common, "--output-dir", str(tmp_path / "fb")]) == 0
    err = capsys.readouterr().err
    s = json.loads((tmp_path / "fb" / "summary.json").read_text())
    assert s["loss_impl"] == "torch" and s["loss_kernel"].startswith("torch")
    assert [(f["what"], f["asked"], f["used"]) for f in s["fallbacks"]] == \
        [("loss", "fused", "torch")]
    assert "sftctl._C has no CPU kernels" in s["fallbacks"][0]["reason"]
    assert "fallback: sftctl._C has no CPU kernels" in err  # at the start
    assert "fallback during this run: loss (asked fused, used torch)" in err  # and at the end
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert ref["fallbacks"] == [] and ref["loss_impl"] == "torch"
    assert [m["loss"] for m in read_metrics(tmp_path / "fb") if m["kind"] == "train"] == \
        [m["loss"] for m in read_metrics(tmp_path / "ref") if m["kind"] == "train"]


def test_compiled_blocks_train_the_same_curve_and_save_the_same_checkpoint(base, tmp_path):
    """--compile (torch.compile of each block's forward, inductor on the CPU here): the same
    per-step losses as eager, the summary says what was compiled, and the checkpoint has the
    eager parameter names (no ``_orig_mod.``) and reloads as a plain HF model."""
    import json

    from safetensors import safe_open

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(16))
    common = ["--model", str(base), "--data", str(data), "--batch-size", "4", "--max-steps",
              "3", "--lr", "1e-3", "--no-eval", "--no-initial-eval", "--quiet", "--device",
              "cpu"]
    assert cli.main(["train", *common, "--output-dir", str(tmp_path / "eager")]) == 0
    assert cli.main(["train", *common, "--output-dir", str(tmp_path / "compiled"),
                     "--compile"]) == 0
    losses = {k: [m["loss"] for m in read_metrics(tmp_path / k) if m["kind"] == "train"]
              for k in ("eager", "compiled")}
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    s = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert s["compiled"] == "2 blocks (LlamaDecoderLayer), forward of each"
    assert json.loads((tmp_path / "eager" / "summary.json").read_text())["compiled"] is None
    keys = {}
    for k in ("eager", "compiled"):
        with safe_open(tmp_path / k / "model" / "model.safetensors", "pt") as f:
            keys[k] = sorted(f.keys())
    assert keys["compiled"] == keys["eager"]
    load_model(tmp_path / "compiled" / "model")


# ------------------------------------------------------------------ deferred (async) metric reads

def _api_trainer(base, data, out, **train):
    from sftctl.run.config import build_config
    from sftctl.training.trainer import Trainer

    pm = get_plugin_manager(entry_points=False)
    cfg = build_config([("t", {
        "model": {"name_or_path": str(base)}, "data": {"paths": [str(data)]},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 4, "seed": 5,
                  "quiet": True, "device": "cpu", **train},
        "eval": {"initial": False, "enabled": False}})], pm.config_options())
    t = Trainer(cfg, pm)
    t.setup()
    return t, pm


@pytest.mark.parametrize("log_every", [1, 4])
def test_deferred_metric_reads_log_exactly_what_synchronous_reads_log(base, tmp_path,
                                                                       monkeypatch, log_every):
    """CUDA's read pattern, forced on the CPU (guard in device mode, metrics read one step
    late from one device vector): the same metrics lines, skipped-step flags, counters and
    weights as reading every logged step at once, with a NaN step skipped on the device."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(40))
    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3")
    runs = {}
    for mode in ("off", "on"):
        t, _ = _api_trainer(base, data, tmp_path / mode, on_nonfinite="skip",
                            log_every=log_every, async_metrics=mode)
        t.guard.mode = "device"  # torch's AdamW takes found_inf on the CPU too
        assert t.deferred_reads is (mode == "on")
        seen = []
        flush = t._flush_metrics

        def spy(flush=flush, seen=seen, t=t):  # which step is read while which is queued
            if t._pending is not None:
                seen.append((t._pending[1], t.state.step))
            flush()

        t._flush_metrics = spy
        t.train()
        runs[mode] = t
        if mode == "on":  # each logged step read after the next one was launched
            assert (1 if log_every == 1 else 4, 2 if log_every == 1 else 5) in seen
    keys = ("step", "epoch", "loss", "lr", "tokens", "trainable_tokens", "tokens_total",
            "grad_norm", "skipped_nonfinite")
    def show(v):  # NaN compares unequal to itself
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    lines = {m: [{k: show(h.get(k)) for k in keys} for h in t.state.history
                 if h["kind"] == "train"] for m, t in runs.items()}
    assert lines["on"] == lines["off"]
    assert [h["step"] for h in lines["on"]] == ([1, 2, 3, 4, 5, 6] if log_every == 1 else [4, 6])
    if log_every == 1:
        assert lines["on"][2]["skipped_nonfinite"] is True and lines["on"][2]["loss"] == "nan"
    for m in runs.values():
        assert m.state.nonfinite_skipped == 1 and m.state.trainable_total > 0
    a, b = (runs[m].unwrapped_model.state_dict() for m in ("off", "on"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deferred_reads_keep_the_stop_guarantee_and_move_hooks_one_step(base, tmp_path,
                                                                        monkeypatch):
    """Under --on-nonfinite stop the update of every step from the bad one on stays masked
    until the deferred read raises (the weights are those after step 2); a plugin's
    request_stop at step k's metrics ends the run after step k + 1 (documented)."""
    from sftctl.errors import TrainingError

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(40))
    two, _ = _api_trainer(base, data, tmp_path / "two", max_steps=2)
    two.train()
    monkeypatch.setenv("SFTCTL_FAULT", "nan_at_step:3")
    t, _ = _api_trainer(base, data, tmp_path / "stop", async_metrics="on")
    t.guard.mode = "device"
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss or gradient norm; the "
                                            r"step was not applied"):
        t.train()
    assert t.state.step == 4  # step 4 ran (queued before step 3 was read), masked
    a, b = two.unwrapped_model.state_dict(), t.unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.delenv("SFTCTL_FAULT")
    t, pm = _api_trainer(base, data, tmp_path / "hook", async_metrics="on")
    t.guard.mode = "device"

    class StopAt2:
        @hookimpl
        def sftctl_step_end(self, run, step):
            if step == 2:
                run.request_stop("test")

    pm.add_plugin(StopAt2(), "stop_at_2_async")
    try:
        t.train()
    finally:
        pm.unregister(name="stop_at_2_async")
        pm.infos.pop("stop_at_2_async")
    assert t.state.step == 3 and [h["step"] for h in t.state.history if h["kind"] == "train"] \
        == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_training_steps_make_no_host_sync(base, tmp_path, compiled):
    """On CUDA (fused head, packed rows through varlen attention, fused AdamW, the guard on the
    device, metrics read one step late): train_step calls run with
    torch.cuda.set_sync_debug_mode('error'), so any synchronizing call inside them fails. Eager:
    every step; compiled (the CUDA default): from step 3 on, after the steps that compile (and
    recompile once for the shapes that change between packed batches)."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(64))
    from sftctl.run.config import build_config
    from sftctl.training.trainer import Trainer

    pm = get_plugin_manager(entry_points=False)
    cfg = build_config([("t", {
        "model": {"name_or_path": str(base), "compile": compiled},
        "data": {"paths": [str(data)], "packing": True, "max_seq_len": 256},
        "optim": {"lr": 3e-3},
        "train": {"output_dir": str(tmp_path / "gpu"), "max_steps": 5, "batch_size": 2,
                  "quiet": True, "device": "cuda", "precision": "bf16"},
        "eval": {"initial": False, "enabled": False}})], pm.config_options())
    t = Trainer(cfg, pm)
    t.setup()
    assert t.head is not None and t.varlen and t.deferred_reads and t.guard.mode == "device"
    assert bool(t.compiled) == compiled
    step = t.train_step
    calls = []

    def strict(rows_list):
        calls.append(1)
        if compiled and len(calls) <= 2:
            return step(rows_list)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(rows_list)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    t.train_step = strict
    t.train()
    train = [h for h in t.state.history if h["kind"] == "train"]
    assert [h["step"] for h in train] == [1, 2, 3, 4, 5] and len(calls) == 5
    assert all(math.isfinite(h["loss"]) for h in train)
    assert t.fold_clip  # clipping went into the fused step's grad_scale, sync-free too


@pytest.mark.parametrize("max_norm", [0.05, 1e9])
def test_folded_clip_gives_the_update_of_clip_then_step(max_norm):
    """The trainer's folded clip (``clip_divisor`` as the fused AdamW's ``grad_scale``) against
    ``clip_grad_norm_`` then the same fused step, on the CPU's fused kernel (the CUDA one has the
    same contract): weights and both moments equal to fp32 rounding when the step is clipped,
    bit for bit when it is not (max_norm 1e9)."""
    from sftctl.training.optim import clip_divisor

    g = torch.Generator().manual_seed(3)
    shapes = [(37, 11), (5,), (128, 64)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 3 for s in shapes]

    def run(fold: bool):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)
        for _ in range(3):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            if fold:
                norm = torch.nn.utils.get_total_norm([p.grad for p in ps])
                opt.grad_scale = clip_divisor(norm, max_norm)
                opt.found_inf = torch.zeros(())
                opt.step()
                del opt.grad_scale, opt.found_inf
            else:
                norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
                opt.step()
        states = [opt.state[p] for p in ps]
        return ps, states, norm

    (pa, sa, na), (pb, sb, nb) = run(False), run(True)
    assert float(na) == float(nb) and float(na) > 0.05  # the norm before clipping, both ways
    for a, b, x, y, w in zip(pa, pb, sa, sb, w0):
        assert not torch.equal(b, w)  # the folded step moved the weights
        if max_norm > 1e6:
            assert torch.equal(a, b) and torch.equal(x["exp_avg"], y["exp_avg"])
        else:
            torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
            torch.testing.assert_close(y["exp_avg"], x["exp_avg"], rtol=2e-6, atol=1e-9)
            torch.testing.assert_close(y["exp_avg_sq"], x["exp_avg_sq"], rtol=4e-6, atol=1e-12)
    if max_norm < 1:  # the clip really bit: without it the first moment would be ~100x larger
        assert float(sb[2]["exp_avg"].abs().max()) < 0.2 * float(grads[2].abs().max())


def test_compile_auto_is_on_for_cuda_transformers_models_only(tmp_path):
    """``model.compile: auto`` (the default): on with CUDA for a transformers model and for a
    peft model around one (unless its base is quantized), off on the CPU and for any other
    wrapper; explicit values win."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftctl.training.config import ModelConfig
    from sftctl.training.model import resolve_compile

    assert ModelConfig().compile == "auto"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile("auto", cuda, model) is True
    assert resolve_compile("auto", cpu, model) is False
    wrapper = torch.nn.Sequential(model)  # what a plugin's wrapper looks like to the trainer
    assert resolve_compile("auto", cuda, wrapper) is False
    assert resolve_compile(True, cpu, wrapper) is True
    assert resolve_compile(False, cuda, model) is False
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert resolve_compile("auto", cuda, peft_model) is True
    assert resolve_compile("auto", cpu, peft_model) is False
    peft_model.base_model.model.config.quantization_config = {"load_in_4bit": True}
    assert resolve_compile("auto", cuda, peft_model) is False
