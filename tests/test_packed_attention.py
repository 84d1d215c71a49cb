"""Packed rows through varlen attention (sftctl.training.attention): the loss of packed documents
equals the loss of the same documents run one by one.

What is checked
- ``collate`` gives packed batches ``cu_seqlens`` (int32, on the host) whose segments are exactly
  the documents (where ``position_ids`` restart) plus each row's padding tail, and
  ``max_seqlen``.
- The ``sftctl_varlen`` attention function with its reference kernel (the CPU path of
  ``--packed-attention varlen``), on real architectures from tiny configs (Llama; Qwen2 with a
  sliding window shorter than the documents; Gemma-2 with attention softcapping and a window):
  per-token logits, the loss and every parameter gradient of a packed batch equal those of each
  document run alone through the model's own attention. A negative control (the same packed
  rows without ``cu_seq_lens``: attention crosses documents) differs, so the comparison can fail.
- The real CLI with ``--packing --packed-attention varlen`` on the CPU names the path in
  summary.json and trains the curve of transformers' own packed path.
- CUDA (skipped without): the automatically chosen kernel (flash-attn or torch varlen_attn) in
  bf16 against documents run one by one, and a short ``sftctl train --packing`` on the GPU that
  names ``sftctl_varlen`` and its kernel, with no fallback.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sftctl_testutil import (alpaca_records, build_tiny_base, cli_env, read_metrics, run_cli,
                             write_jsonl)
from sftctl_testutil import no_installed_plugins  # noqa: F401 (autouse)

V = 80
DOCS = [[7, 13, 4], [16, 5], [9]]  # rows of document lengths: 24, 21, 9 tokens (padded to 24)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":  # every layer windowed, window shorter than the longest document
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=6,
                             max_window_layers=0, layer_types=["sliding_attention"] * 2)
    else:
        cfg = tf.Gemma2Config(**common, attn_logit_softcapping=3.0, sliding_window=5,
                              final_logit_softcapping=None, query_pre_attn_scalar=8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # sharper attention than the default init
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(8.0)
    return model


def documents(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, V, (n,), generator=g) for n in row] for row in DOCS]


def packed_batch(docs, packing: bool = True):
    """The packed rows as ``collate`` builds them (from a stand-in of the tokenized split that
    offers what collate reads: ``rows(indices) -> [(ids, loss_mask)]``)."""
    from sftctl.data.batching import collate

    class Split:  # the interface collate reads: rows(indices) -> [(ids, mask)]
        def __init__(self, seqs):
            self.seqs = seqs

        def rows(self, idx):
            return [(self.seqs[i].tolist(), [1] * len(self.seqs[i])) for i in idx]

    flat = [d for row in docs for d in row]
    rows, k = [], 0
    for row in docs:
        rows.append(list(range(k, k + len(row))))
        k += len(row)
    if not packing:
        rows = [[i] for i in range(len(flat))]
    return collate(Split(flat), rows, pad_id=0, packing=packing)


def test_collate_gives_cu_seqlens_on_the_host():
    mb = packed_batch(documents())
    T = max(sum(r) for r in DOCS)
    assert mb.input_ids.shape == (3, T)
    assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens.device.type == "cpu"
    # segments: every document, then each row's padding tail (row 1: 3 tokens, row 2: 15)
    lens = [7, 13, 4, 16, 5, 3, 9, 15]
    assert mb.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    assert mb.max_seqlen == 16
    # the same boundaries transformers finds from the position ids (a restart at 0)
    flat_pos = mb.position_ids.reshape(-1)
    starts = (flat_pos == 0).nonzero()[:, 0].tolist()
    assert starts == mb.cu_seqlens[:-1].tolist()
    kw = mb.model_inputs(varlen=True)
    assert kw["cu_seq_lens_q"] is mb.cu_seqlens and kw["max_length_k"] == 16
    assert "cu_seq_lens_q" not in mb.model_inputs()
    # padded rows: one segment per example and one per padding tail (checked with the model in
    # test_padded_rows_through_varlen_equal_the_masked_forward)
    padded = packed_batch(documents(), packing=False)
    assert "cu_seq_lens_q" not in padded.model_inputs()


def per_token_losses(logits, ids):
    """Next-token loss of every position but the last of each document: ``[n]``."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_varlen_equals_documents_one_by_one(arch):
    from sftctl.training import attention

    docs = documents()
    model = tiny_model(arch)
    # one by one, through the model's own (eager) attention
    ref_losses, ref_logits = [], []
    for row in docs:
        for d in row:
            logits = model(input_ids=d[None], use_cache=False).logits[0]   # [n, V]
            ref_logits.append(logits.detach())
            ref_losses.append(per_token_losses(logits, d))
    ref = torch.cat(ref_losses).sum()
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert attention.install(model, "reference") is None  # the probe passed
    mb = packed_batch(docs)
    before = attention.CALLS.get("reference", 0)
    out = model(**mb.model_inputs(varlen=True)).logits                      # [B, T, V]
    assert attention.CALLS["reference"] - before == 2                        # both layers
    losses, k = [], 0
    for b, row in enumerate(docs):
        at = 0
        for d in row:
            logits = out[b, at:at + len(d)]
            torch.testing.assert_close(logits.detach(), ref_logits[k], rtol=1e-5, atol=2e-5)
            losses.append(per_token_losses(logits, d))
            at += len(d)
            k += 1
    packed = torch.cat(losses).sum()
    assert float(packed.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    packed.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6, msg=n)

    # negative control: without the document bounds attention crosses documents in a row
    with torch.no_grad():
        kw = mb.model_inputs(varlen=True)
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kw.pop(key)
        crossed = model(**kw).logits
    second = crossed[0, 7:20]  # row 0's second document
    assert (second - ref_logits[1]).abs().max() > 1e-2
    attention.uninstall(model)
    assert model.config._attn_implementation == "eager"


def test_kernel_choice_names_what_a_model_needs():
    from sftctl.training import attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    llama = attention.model_needs(tiny_model("llama").config, torch.bfloat16)
    gemma = attention.model_needs(tiny_model("gemma2").config, torch.bfloat16)
    assert llama == {"softcap": None, "window": None, "dropout": 0.0, "head_dim": 8, "half": True}
    assert gemma["softcap"] == 3.0 and gemma["window"] == 5
    assert attention.kernel_for(llama, cpu) == ("reference", None)
    kernel, why = attention.kernel_for(dict(llama, half=False), cuda)
    assert kernel is None and "bf16/fp16" in why
    kernel, why = attention.kernel_for(gemma, cuda)
    if attention.flash_attn_func() is None:
        assert kernel is None and "softcapping" in why  # torch's varlen_attn has no softcap
    else:
        assert kernel == "flash_attn"


def test_unpacked_rows_kernel_choice():
    """Unpacked rows take cuDNN attention only on a GPU and only for models whose attention that
    path covers (no softcap, window or dropout); the reason is named otherwise."""
    from sftctl.training import attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    llama = tiny_model("llama").config
    gemma = tiny_model("gemma2").config
    needs = attention.model_needs(llama, torch.bfloat16)
    assert attention.rows_kernel_for(needs, llama, cpu, torch.bfloat16) == (None, None)
    rows, why = attention.rows_kernel_for(attention.model_needs(gemma, torch.bfloat16), gemma,
                                          cuda, torch.bfloat16)
    assert rows is None and why == "cuDNN attention path lacks softcap, window"


@_CUDA
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_unpacked_rows_on_cudnn_equal_the_masked_forward(compiled):
    """On the GPU, right-padded (unpacked) rows go to SDPA's cuDNN attention with no mask and no
    segments; the real tokens' logits and the parameter gradients of their loss equal the
    model's own masked sdpa forward (bf16 autocast noise), eager and inside compiled blocks."""
    import transformers as tf

    from sftctl.training import attention

    dev = torch.device("cuda")
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=128, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(dev)
    needs = attention.model_needs(model.config, torch.bfloat16)
    rows, why = attention.rows_kernel_for(needs, model.config, dev, torch.bfloat16)
    assert rows == "cudnn", why
    docs = [[d] for row in documents() for d in row]  # one example per row, right-padded
    mb = packed_batch(docs, packing=False).to(dev)
    lens = [len(r[0]) for r in docs]
    real = mb.attention_mask.bool()                                          # [B, T]

    def loss_and_grads(kw):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**kw).logits.float()                              # [B, T, V]
        loss = (logits.log_softmax(-1)[..., 1] * real).sum()
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, g_ref = loss_and_grads(mb.model_inputs())                          # masked sdpa
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert attention.install(model, "torch", rows) is None
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    before = attention.CALLS.get("cudnn", 0)
    kw = mb.model_inputs(varlen=True)
    assert "attention_mask" not in kw and "cu_seq_lens_q" not in kw
    got, g = loss_and_grads(kw)
    if not compiled:
        assert attention.CALLS["cudnn"] - before == cfg.num_hidden_layers
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b, :n], ref[b, :n], rtol=3e-2, atol=3e-2)
    for n, p in g_ref.items():  # bf16 autocast (and compiled-block) noise: relative L2
        err = float((g[n] - p).norm() / p.norm().clamp_min(1e-12))
        assert err < 3e-2, (n, err)
    attention.uninstall(model)


# ------------------------------------------------------------------------------ the real CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    base = build_tiny_base(tmp / "base")
    data = write_jsonl(tmp / "train.jsonl", alpaca_records(32, seed=6))
    return tmp, base, data


def train(tiny, out, *extra):
    tmp, base, data = tiny
    return run_cli(["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                    "--no-eval", "--no-initial-eval", "--max-steps", "4", "--batch-size", "2",
                    "--packing", "--max-seq-len", "256", "--lr", "3e-3", "--seed", "3", *extra],
                   env=cli_env(tmp))


def test_cli_packed_varlen_on_the_cpu_trains_the_curve_of_the_default_path(tiny, tmp_path):
    curves = {}
    for name, extra in (("varlen", ["--packed-attention", "varlen"]),
                        ("model", ["--packed-attention", "model", "--loss-impl", "torch"])):
        r = train(tiny, tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        curves[name] = [x["loss"] for x in read_metrics(tmp_path / name) if x["kind"] == "train"]
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["fallbacks"] == []
        if name == "varlen":
            assert s["attention"]["implementation"] == "sftctl_varlen"
            assert "per document" in s["attention"]["kernel"]
            assert "packed attention: sftctl_varlen" in r.stderr
            assert s["loss_head"]["fused"] is True
        else:
            assert s["attention"]["implementation"] == "sdpa" and not s["attention"]["varlen"]
    assert len(curves["varlen"]) == 4
    np.testing.assert_allclose(curves["varlen"], curves["model"], rtol=1e-5)


# ------------------------------------------------------------------------------------ CUDA



@_CUDA
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_packed_varlen_kernel_equals_documents_one_by_one(arch):
    from sftctl.training import attention

    dev = torch.device("cuda")
    model = tiny_model(arch).to(dev)
    needs = attention.model_needs(model.config, torch.bfloat16)
    kernel, why = attention.kernel_for(needs, dev)
    assert kernel in ("flash_attn", "torch"), why
    docs = [[d.to(dev) for d in row] for row in documents()]
    ref_logits = []
    model.config._attn_implementation = "sdpa"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for row in docs:
            for d in row:
                ref_logits.append(model(input_ids=d[None], use_cache=False).logits[0].float())
    model.config._attn_implementation = "eager"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert attention.install(model, kernel) is None
    mb = packed_batch([[d.cpu() for d in row] for row in docs]).to(dev)
    before = attention.CALLS.get(kernel, 0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**mb.model_inputs(varlen=True)).logits.float()
    assert attention.CALLS[kernel] - before == 2
    k = 0
    for b, row in enumerate(docs):
        at = 0
        for d in row:
            got = out[b, at:at + len(d)]
            torch.testing.assert_close(got, ref_logits[k], rtol=3e-2, atol=3e-2)
            at += len(d)
            k += 1
    attention.uninstall(model)


@_CUDA
def test_cuda_cli_packing_names_the_varlen_path(tiny, tmp_path):
    r = train(tiny, tmp_path / "gpu", "--device", "cuda", "--precision", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert s["attention"]["implementation"] == "sftctl_varlen", s["attention"]
    assert s["attention"]["kernel"] in ("flash-attn flash_attn_varlen_func",
                                        "torch.nn.attention.varlen.varlen_attn")
    assert "packed attention: sftctl_varlen" in r.stderr
    # unpacked rows (eval batches, --no-packing) would take cuDNN attention on this GPU
    assert s["attention"]["rows_kernel"] == "SDPA with cuDNN attention, causal per row", \
        s["attention"]
    assert s["fallbacks"] == [] and s["loss_head"]["fused"] is True
    assert s["async_metrics"] is True
    assert s["cuda_allocator"]["mode"] == ("env" if os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
                                           else "expandable"), s["cuda_allocator"]
    # the curve of transformers' own packed path (sdpa, block mask) within bf16 noise
    r = train(tiny, tmp_path / "ref", "--device", "cuda", "--precision", "bf16",
              "--packed-attention", "model")
    assert r.returncode == 0, r.stderr[-3000:]
    a = [x["loss"] for x in read_metrics(tmp_path / "gpu") if x["kind"] == "train"]
    b = [x["loss"] for x in read_metrics(tmp_path / "ref") if x["kind"] == "train"]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=2e-2)


@pytest.mark.parametrize("version", ["2.10", "2.13"])
def test_torch_varlen_call_adapts_to_the_installed_signature(version, monkeypatch):
    """The call into torch's varlen_attn (CUDA only) built for two signatures: torch 2.10's
    (is_causal, no scale, no GQA) and 2.13's (window_size, scale, enable_gqa). A stand-in with
    that signature checks the arguments and computes the attention exactly; the result must
    equal the reference with the model's scale, window and GQA."""
    from sftctl.training import attention

    g = torch.Generator().manual_seed(0)
    N, Hq, Hkv, D = 17, 4, 2, 8
    q, k, v = (torch.randn(N, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, 5, 12, 17], dtype=torch.int32)
    scaling, window = 0.21, 4

    def exact(q, k, v, cu, scale, left):
        return attention.reference_varlen(q, k, v, cu, scaling=scale,
                                          window=None if left < 0 else left + 1)

    if version == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            assert is_causal and key.shape[1] == query.shape[1] and max_q == 7
            return exact(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, -1)
        want = attention.reference_varlen(q, k, v, cu, scaling=scaling)
        monkeypatch.setattr(attention, "torch_varlen_func", lambda: varlen_attn)
        got = attention._torch_varlen(q, k, v, cu, 7, scaling, None)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                        scale=None, window_size=(-1, -1), enable_gqa=False):
            assert enable_gqa and key.shape[1] == Hkv and window_size[1] == 0
            return exact(query, key, value, cu_seq_q, scale, window_size[0])
        want = attention.reference_varlen(q, k, v, cu, scaling=scaling, window=window)
        monkeypatch.setattr(attention, "torch_varlen_func", lambda: varlen_attn)
        got = attention._torch_varlen(q, k, v, cu, 7, scaling, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padded_rows_through_varlen_equal_the_masked_forward():
    """Padded (unpacked) rows take the sftctl_varlen function too (CUDA default): the mask is
    dropped and no segments are passed (one causal sequence per right-padded row), and the real
    tokens' logits equal the model's own masked forward."""
    from sftctl.training import attention

    docs = [[d] for row in documents() for d in row]  # one example per row
    model = tiny_model("qwen2")
    mb = packed_batch(docs, packing=False)
    assert mb.attention_mask is not None and mb.cu_seqlens is not None
    lens = [len(r[0]) for r in docs]
    T = max(lens)
    want_cu = np.cumsum([0] + [x for n in lens for x in ((n, T - n) if n < T else (n,))])
    assert mb.cu_seqlens.tolist() == want_cu.tolist() and mb.max_seqlen == T
    with torch.no_grad():
        ref = model(**mb.model_inputs()).logits                      # masked, eager
        assert attention.install(model, "reference") is None
        kw = mb.model_inputs(varlen=True)
        assert "attention_mask" not in kw and "cu_seq_lens_q" not in kw
        got = model(**kw).logits
    attention.uninstall(model)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b, :n], ref[b, :n], rtol=1e-5, atol=2e-5)


def test_a_kernel_without_backward_is_refused_at_setup(monkeypatch):
    """The setup probe runs a backward too: a kernel that cannot is refused (a counted fallback
    in the trainer) instead of failing at the first training step; the model keeps its own
    attention and no gradient is left behind."""
    from sftctl.training import attention

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("this kernel has no backward")

    exact = attention.reference_varlen
    monkeypatch.setattr(attention, "reference_varlen",
                        lambda *a, **kw: NoBackward.apply(exact(*a, **kw)))
    model = tiny_model("llama")
    why = attention.install(model, "reference")
    assert why is not None and "no backward" in why and "forward/backward" in why
    assert model.config._attn_implementation == "eager"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_packed_bf16_default_paths_match_one_gpu(tiny, tmp_path, strategy):
    """torchrun on 2 GPUs with the defaults (fused head, varlen attention, deferred metric
    reads, the one-step-late preemption agreement): the curve of one GPU with the same global
    batch, within bf16 noise, and the same paths named in summary.json."""
    import subprocess
    import sys

    tmp, base, data = tiny
    common = ["train", "--model", str(base), "--data", str(data), "--no-eval",
              "--no-initial-eval", "--max-steps", "4", "--packing", "--max-seq-len", "256",
              "--lr", "3e-3", "--seed", "3", "--device", "cuda", "--precision", "bf16",
              "--quiet"]
    r = run_cli([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "2"],
                env=cli_env(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "sftctl", *common, "--output-dir",
                        str(tmp_path / "two"), "--batch-size", "1", "--strategy", strategy],
                       env=cli_env(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    curves = [[x["loss"] for x in read_metrics(tmp_path / d) if x["kind"] == "train"]
              for d in ("one", "two")]
    assert len(curves[0]) == len(curves[1]) == 4
    np.testing.assert_allclose(curves[1], curves[0], rtol=2e-2)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["fallbacks"] == []
    assert s["loss_head"]["fused"] is True and s["attention"]["implementation"] == "sftctl_varlen"
    assert s["async_metrics"] is True
