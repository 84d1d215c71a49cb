"""CUDA-only tests of the fused ops: what the CPU reference tests (test_ops.py, which also run on
CUDA through the ``device`` fixture) cannot show.

- CUDA-graph capture of forward + backward, replayed on new data (no host sync anywhere: the
  normalizer and the non-ignored count are read on the device);
- bit-determinism run to run, both kernel variants (cluster/shared-memory and global);
- the large shape N=16384, V=151936 (N*V > 2^31 elements) against float64;
- torch.compile(fullgraph=True) of labels + loss + backward;
- memory mode allocates no second N x V buffer;
- an invalid target stops the kernel with a device-side assert (in a subprocess: a device assert
  poisons the CUDA context of the process that hits it).

Skipped without a GPU or without the CUDA kernels in sftctl._C. Kept small: each test runs in
about a second on an H100 (the large shape in a few).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sftctl
from sftctl import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not sftctl.extension_info().get("cuda", False),
    reason="needs a CUDA device and sftctl._C built with CUDA kernels")

DEV = "cuda"


def _inputs(n, v, dtype=torch.bfloat16, ignore_frac=0.3, seed=0, scale=2.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(n, v, device=DEV, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEV, generator=g)
    targets[torch.rand(n, device=DEV, generator=g) < ignore_frac] = -100
    return logits, targets


def _fwd_bwd(logits, targets, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), leaf.grad


def _ref_rows(logits, targets, chunk=1024):
    """float64 per-row loss and lse on the GPU, in row chunks (no N x V fp64 tensor)."""
    losses, lses = [], []
    for i in range(0, logits.shape[0], chunk):
        x = logits[i:i + chunk].double()
        t = targets[i:i + chunk]
        lse = torch.logsumexp(x, -1)
        valid = t != -100
        zt = x.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        losses.append(torch.where(valid, lse - zt, 0.0))
        lses.append(torch.where(valid, lse, 0.0))
    return torch.cat(losses), torch.cat(lses)


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)  # reshape: 0-dim cannot view


@pytest.mark.parametrize("mean_divisor", ["count", "normalizer"])
def test_cuda_graph_capture_forward_backward(mean_divisor):
    n, v = 512, 32000
    logits, targets = _inputs(n, v, seed=1)
    param = logits.clone().requires_grad_()
    static_targets = targets.clone()
    normalizer = torch.tensor(123.0, device=DEV)
    kw = {"normalizer": normalizer} if mean_divisor == "normalizer" else {}

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernel attributes)
        for _ in range(2):
            param.grad = None
            ops.cross_entropy(param, static_targets, **kw).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    param.grad = None
    with torch.cuda.graph(graph):
        static_loss = ops.cross_entropy(param, static_targets, **kw)
        static_loss.backward()

    for trial in range(3):
        new_logits, new_targets = _inputs(n, v, seed=10 + trial)
        with torch.no_grad():
            param.copy_(new_logits)
        static_targets.copy_(new_targets)
        normalizer.fill_(50.0 + trial)  # read on the device at replay time
        graph.replay()
        eager_kw = {"normalizer": normalizer.clone()} if kw else {}
        ref_loss, ref_grad = _fwd_bwd(new_logits, new_targets, **eager_kw)
        torch.cuda.synchronize()
        assert torch.equal(_bits(static_loss), _bits(ref_loss)), (trial, static_loss, ref_loss)
        assert torch.equal(_bits(param.grad), _bits(ref_grad)), trial


@pytest.mark.parametrize("kernel", ["cluster", "global"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "softcap": 20.0, "z_loss": 1e-4}])
def test_bit_determinism(kernel, opts, monkeypatch):
    if kernel == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster kernel needs sm_90")
    monkeypatch.setenv("SFTCTL_CE_KERNEL", kernel)  # read by the launcher at every call
    logits, targets = _inputs(2048, 128256, seed=2)
    runs = [_fwd_bwd(logits, targets, **opts) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(_bits(loss), _bits(runs[0][0]))
        assert torch.equal(_bits(grad), _bits(runs[0][1]))
    # memory mode computes the same bits as the functional op
    x = logits.clone()
    out = torch.ops.sftctl.cross_entropy_(x, targets, None, None, -100, 1,
                                          opts.get("label_smoothing", 0.0),
                                          opts.get("z_loss", 0.0), opts.get("softcap", 0.0),
                                          False, False)
    assert torch.equal(_bits(out[0]), _bits(runs[0][0]))
    assert torch.equal(_bits(x), _bits(runs[0][1]))


def test_kernel_variants_agree_with_float64(monkeypatch):
    """Both kernel variants, and clusters of up to 16 CTAs (forced by a tiny slice budget)."""
    logits, targets = _inputs(64, 50257, dtype=torch.float32, seed=3)
    ref_loss, ref_lse = _ref_rows(logits, targets)
    settings = [("global", None), ("cluster", None), ("cluster", "4"), ("cluster", "2")]
    for kernel, slice_kb in settings:
        monkeypatch.setenv("SFTCTL_CE_KERNEL", kernel)
        if slice_kb:
            monkeypatch.setenv("SFTCTL_CE_SLICE_KB", slice_kb)
        else:
            monkeypatch.delenv("SFTCTL_CE_SLICE_KB", raising=False)
        out = ops.cross_entropy(logits, targets, reduction="none", return_lse=True)
        err = ((out.loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)).max()
        assert err <= 1e-6, (kernel, slice_kb, float(err))
        lerr = ((out.lse.double() - ref_lse).abs() / ref_lse.abs().clamp_min(1.0)).max()
        assert lerr <= 1e-6, (kernel, slice_kb, float(lerr))


def test_large_shape_beyond_int32_offsets():
    n, v = 16384, 151936  # n * v = 2.49e9 > 2^31
    assert n * v > 2**31
    logits, targets = _inputs(n, v, seed=4, scale=3.0)
    targets[-1] = v - 1  # the last row, whose offsets exceed 2^31 elements, is never ignored
    ref_loss, _ = _ref_rows(logits, targets)
    leaf = logits.requires_grad_()
    loss = ops.cross_entropy(leaf, targets, reduction="none")
    loss.backward(torch.ones_like(loss))
    rel = ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)).max()
    assert rel <= 1e-6, float(rel)
    mean = ops.cross_entropy(logits.detach(), targets)
    ref_mean = ref_loss.sum() / (targets != -100).sum()
    assert abs(float(mean) - float(ref_mean)) <= 1e-6 * abs(float(ref_mean))
    rows = torch.tensor([0, 1, 8191, 14135, n - 2, n - 1], device=DEV)
    x = logits.detach()[rows].double()
    t = targets[rows]
    p = torch.softmax(x, -1)
    valid = t != -100
    p[valid, t[valid]] -= 1.0
    p[~valid] = 0.0
    g = leaf.grad[rows].double()
    err = (g - p).abs().max()
    rounding = (p.to(torch.bfloat16).double() - p).abs().max()
    assert err <= 2 * rounding + 1e-6 * p.abs().max(), (float(err), float(rounding))


def test_torch_compile_fullgraph_cuda():
    b, t, v = 4, 256, 32000
    g = torch.Generator(device=DEV).manual_seed(5)
    input_ids = torch.randint(0, v, (b, t), device=DEV, generator=g)
    loss_mask = torch.rand(b, t, device=DEV, generator=g) < 0.6
    base = torch.randn(b, t, v, device=DEV, generator=g).to(torch.bfloat16)

    def step(logits, ids, mask):
        labels, n = ops.sft_labels(ids, loss_mask=mask)
        return ops.cross_entropy(logits, labels, normalizer=n.float())

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        leaf = base.clone().requires_grad_()
        loss = fn(leaf, input_ids, loss_mask)
        loss.backward()
        outs.append((loss.detach(), leaf.grad))
    assert torch.equal(_bits(outs[0][0]), _bits(outs[1][0]))
    assert torch.equal(_bits(outs[0][1]), _bits(outs[1][1]))


def test_memory_mode_allocates_no_second_buffer():
    n, hdim, v = 4096, 64, 32000
    g = torch.Generator(device=DEV).manual_seed(6)
    h = torch.randn(n, hdim, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hdim, v, device=DEV, generator=g, dtype=torch.bfloat16) * 0.1
    targets = torch.randint(0, v, (n,), device=DEV, generator=g)
    nv_bytes = n * v * 2
    extra = {}
    for inplace in (False, True):
        logits = h @ w  # [N, V] bf16, a non-leaf as in a model's lm_head
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = ops.cross_entropy(logits, targets, inplace_backward=inplace)
        loss.backward()
        torch.cuda.synchronize()
        extra[inplace] = torch.cuda.max_memory_allocated() - before
        h.grad = None
        del logits, loss
    assert extra[False] >= nv_bytes  # the functional op holds a gradient buffer
    assert extra[True] < 0.05 * nv_bytes, extra  # memory mode: no N x V buffer at all


def test_invalid_target_is_a_device_assert():
    code = (
        "import torch, sftctl.ops as o\n"
        "x = torch.randn(4, 10, device='cuda')\n"
        "t = torch.tensor([1, 2, 10, 3], device='cuda')\n"
        "loss = o.cross_entropy(x, t)\n"
        "torch.cuda.synchronize()\n"
        "print('NO ERROR')\n")
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "NO ERROR" not in out, out
    assert "targets[2] = 10 is outside [0, 10)" in out, out
    assert "device-side assert" in out, out


def test_sft_labels_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    b, t = 6, 777
    ids = torch.randint(0, 50000, (b, t), generator=g)
    kw = {
        "loss_mask": torch.rand(b, t, generator=g) < 0.7,
        "attention_mask": (torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b, 1),
                                                                    generator=g)).long(),
        "prompt_lengths": torch.randint(0, t // 3, (b,), generator=g),
        "position_ids": torch.randint(0, 50, (b, t), generator=g),
        "document_ids": torch.cumsum(torch.rand(b, t, generator=g) < 0.01, 1),
    }
    for keys in ([], ["loss_mask"], ["attention_mask", "prompt_lengths"],
                 ["position_ids"], ["document_ids", "loss_mask", "attention_mask"], list(kw)):
        sub = {k: kw[k] for k in keys}
        cpu_labels, cpu_n = ops.sft_labels(ids, **sub)
        gpu_labels, gpu_n = ops.sft_labels(ids.to(DEV), **{k: x.to(DEV) for k, x in sub.items()})
        assert torch.equal(gpu_labels.cpu(), cpu_labels), keys
        assert int(gpu_n) == int(cpu_n) == int((cpu_labels != -100).sum()), keys


def test_grad_output_rescale_and_noop():
    """grad_output != grad_scale rescales in place (one pass); equal leaves the gradient as is."""
    logits, targets = _inputs(256, 32000, dtype=torch.float32, seed=8)
    _, g1 = _fwd_bwd(logits, targets)
    leaf = logits.clone().requires_grad_()
    (ops.cross_entropy(leaf, targets) * 3.0).backward()
    torch.testing.assert_close(leaf.grad, g1 * 3.0, rtol=1e-6, atol=0)
    gs = torch.tensor(8.0, device=DEV)
    leaf = logits.clone().requires_grad_()
    ops.cross_entropy(leaf, targets, grad_scale=gs).backward(gs)
    torch.testing.assert_close(leaf.grad, g1 * 8.0, rtol=1e-6, atol=0)
    ref = F.cross_entropy(logits.double(), targets, ignore_index=-100)
    assert abs(float(ops.cross_entropy(logits, targets)) - float(ref)) <= 1e-6 * float(ref)
