"""sftctl.ops.linear_cross_entropy (and its stock-PyTorch twin) against a float64 reference.

The reference (``ref_lce``) runs on the same values (hidden, weight and bias rounded to the GEMM
dtype, then converted exactly to float64), writes the loss out by hand and takes every gradient
from float64 autograd. Criteria:
- loss and lse: relative error <= 1e-6 (fp32 logits and fp32/fp64 accumulation);
- dhidden, dweight, dbias per element: the final rounding to the output dtype plus the rounding
  of the logits' gradient to the GEMM dtype (and fp32 arithmetic) relative to that element's own
  terms: |err| <= u_out |ref| + u_g * (|G| @ |W|) for dhidden (|G|^T @ |H| for dweight, sum |G|
  for dbias), G the float64 gradient of the logits. A wrong softmax, scale or mask fails by
  orders of magnitude; a bf16 rounding of the logits (not done) would fail the loss criterion.
CUDA cases run where a GPU and the CUDA kernels exist (the ``device`` fixture); the large-shape,
graph-capture and peak-memory cases are CUDA-only at the end of the file.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import sftctl
from sftctl import ops

_HAS_CUDA = torch.cuda.is_available() and sftctl.extension_info().get("cuda", False)
_CUDA = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device and CUDA kernels")

MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "scale": {"logit_scale": 0.625},
    "normalizer": {"normalizer": 37.0},
    "grad_scale": {"grad_scale": 64.0},
    "lse": {"return_lse": True},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "logit_scale": 1.5,
            "return_lse": True, "grad_scale": 8.0},
}


def make_inputs(n, d, v, dtype, device, ignore="some", bias=False, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + d * 7 + v)
    h = (torch.randn(n, d, generator=g) * 1.5).to(dtype)
    w = (torch.randn(v, d, generator=g) / math.sqrt(max(d, 1)) * 2.0).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore == "some" and n > 1:
        t[torch.rand(n, generator=g) < 0.3] = ignore_index
        t[0] = ignore_index
    elif ignore == "all":
        t[:] = ignore_index
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(h), mv(w), t.to(device), mv(b)


def ref_lce(h, w, t, b=None, *, gemm_dtype, ignore_index=-100, reduction="mean",
            label_smoothing=0.0, normalizer=None, z_loss=0.0, softcap=None, logit_scale=None,
            **_):
    """float64 loss/lse/logits of the op's definition; h, w, b are float64 leaves (rounded to
    the GEMM dtype first by the caller)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    if logit_scale is not None:
        z = z * logit_scale
    z.retain_grad()
    zc = softcap * torch.tanh(z / softcap) if softcap else z
    v = zc.shape[1]
    valid = t != ignore_index
    st = torch.where(valid, t, 0)
    lse = torch.logsumexp(zc, 1)
    row = (1 - label_smoothing) * (lse - zc.gather(1, st[:, None])[:, 0])
    if label_smoothing:
        row = row + label_smoothing * (lse - zc.sum(1) / v)
    row = row + z_loss * lse * lse
    row = torch.where(valid, row, 0.0)
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        div = float(normalizer) if normalizer is not None else float(valid.sum())
        loss = row.sum() / div if div else row.sum() * 0.0
    return loss, torch.where(valid, lse, 0.0).detach(), z


def grad_terms(z, t, rl, go, *, reduction, ignore_index=-100, label_smoothing=0.0,
               normalizer=None, z_loss=0.0, softcap=None, logit_scale=None, **_):
    """Per element of the raw logits' gradient, the sum of magnitudes it is computed from:
    s * ls * (p |1 + 2 c lse| + eps / V + (1 - eps) [j == y]) * (1 - tanh^2), s the row's factor
    of the reduction and grad_output. Rounding errors scale with this, not with the (possibly
    cancelling) gradient itself."""
    ls = 1.0 if logit_scale is None else abs(logit_scale)
    tz = torch.tanh(z / softcap) if softcap else None  # z is already scaled (ref_lce)
    zc = softcap * tz if softcap else z
    v = z.shape[1]
    valid = t != ignore_index
    lse = torch.logsumexp(zc, 1, keepdim=True)
    p = torch.exp(zc - lse)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(z.shape[0]), torch.where(valid, t, 0)] = 1.0
    go = go.double().cpu().reshape(-1)
    if reduction == "mean":
        div = float(normalizer) if normalizer is not None else float(valid.sum())
        srow = (go / div if div else go * 0).expand(z.shape[0])
    else:
        srow = go.expand(z.shape[0])
    terms = p * (1 + 2 * z_loss * lse).abs() + label_smoothing / v + (1 - label_smoothing) * onehot
    if softcap:
        terms = terms * (1 - tz * tz)
    terms = terms * (srow.abs() * ls * valid)[:, None]
    return terms


def _u(dtype):
    return 2.0 ** -MANT[dtype]


def check_rel(actual, expected, rel=1e-6, abs_=1e-7, what="loss"):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    ok = err <= rel * e.abs() + abs_
    assert bool(ok.all()), (f"{what}: max error {err.max().item():.3e} "
                            f"(max |ref| {e.abs().max():.3e})")


def check_grad(actual, expected, terms, out_dtype, gemm_dtype, what, roundings=1, fan=None):
    """|err| <= roundings * u_out |ref| + u_g * terms (+ fp32 slack); see the module doc."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.dtype == out_dtype, f"{what}: dtype {actual.dtype}, expected {out_dtype}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    tm = terms.detach().double().cpu()
    u_g = _u(gemm_dtype) if gemm_dtype != torch.float32 else 0.0
    tol = roundings * _u(out_dtype) * e.abs() + (u_g + 2e-5) * tm + 1e-30
    if gemm_dtype == torch.float16:  # the logits' gradient can underflow fp16's subnormals:
        tol = tol + 2.0 ** -25 * fan.double().cpu()  # 2^-25 absolute per element of it
    if out_dtype == torch.float16:  # fp16's subnormal spacing, absolute
        tol = tol + roundings * 2.0 ** -24
    err = (a - e).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements out of bound; worst err "
        f"{err[bad].max().item():.3e} vs tol {tol[bad].min().item():.3e}; max |ref| "
        f"{e.abs().max().item():.3e}")


def run_case(fn, h, w, t, b, *, grad_out=None, want=(True, True, True), **kw):
    """Forward + backward of ``fn``; returns (loss, lse, dh, dw, db)."""
    hh = h.detach().clone().requires_grad_(want[0])
    ww = w.detach().clone().requires_grad_(want[1])
    bb = None if b is None else b.detach().clone().requires_grad_(want[2])
    out = fn(hh, ww, t, bb, **kw)
    loss, lse = (out.loss, out.lse) if kw.get("return_lse") else (out, None)
    if any(want):
        go = torch.ones_like(loss) if grad_out is None else grad_out
        loss.backward(go)
    return (loss.detach(), lse, hh.grad, ww.grad, None if bb is None else bb.grad)


def compare(fn, h, w, t, b, *, reduction="mean", grad_out=None, gemm_dtype=None, **kw):
    gemm_dtype = gemm_dtype or h.dtype
    loss, lse, dh, dw, db = run_case(fn, h, w, t, b, reduction=reduction, grad_out=grad_out,
                                     **kw)
    h64 = h.to(gemm_dtype).double().cpu().requires_grad_()
    w64 = w.to(gemm_dtype).double().cpu().requires_grad_()
    b64 = None if b is None else b.to(gemm_dtype).double().cpu().requires_grad_()
    rl, rlse, z = ref_lce(h64, w64, t.cpu(), b64, gemm_dtype=gemm_dtype, reduction=reduction,
                          **kw)
    go = torch.ones_like(rl) if grad_out is None else grad_out.double().cpu()
    rl.backward(go)
    check_rel(loss, rl, what="loss")
    if kw.get("return_lse"):
        assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(t.shape)
        check_rel(lse, rlse, rel=1e-6, abs_=1e-6, what="lse")
    G = grad_terms(z.detach(), t.cpu(), rl, go, reduction=reduction, **kw)  # [N, V]
    # a grad_output different from grad_scale rescales the saved gradients: one more rounding
    gs = kw.get("grad_scale")
    extra = 2 if (grad_out is not None or (gs is not None and reduction != "none")) else 1
    ones = (G > 0).double()  # [N, V] the elements that can carry an underflow error
    wa, ha = w64.detach().abs(), h64.detach().abs()
    check_grad(dh, h64.grad, G @ wa, h.dtype, gemm_dtype, "dhidden", extra, ones @ wa)
    check_grad(dw, w64.grad, G.t() @ ha, w.dtype, gemm_dtype, "dweight", extra, ones.t() @ ha)
    if b is not None:
        check_grad(db, b64.grad, G.sum(0), b.dtype, gemm_dtype, "dbias", extra, ones.sum(0))
    return loss


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, d, V): one row; d = 1; V = 1 and 3; odd sizes; N not a multiple of the chunk (chunk 64)
SHAPES = [(1, 1, 3), (5, 1, 1), (7, 17, 129), (333, 64, 1000)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_shapes_dtypes(device, dtype, shape, reduction):
    n, d, v = shape
    # options rotate over the cases so every dtype and shape meets several of them
    key = sorted(OPTIONS)[(DTYPES.index(dtype) * 7 + SHAPES.index(shape) * 3
                           + ["mean", "sum", "none"].index(reduction)) % len(OPTIONS)]
    kw = dict(OPTIONS[key])
    if reduction != "mean":
        kw.pop("normalizer", None)
    h, w, t, b = make_inputs(n, d, v, dtype, device, bias=(n % 2 == 1))
    compare(ops.linear_cross_entropy, h, w, t, b, reduction=reduction, chunk_rows=64, **kw)


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_options(device, opt, reduction, ignore):
    kw = dict(OPTIONS[opt])
    if reduction != "mean":
        kw.pop("normalizer", None)
    h, w, t, b = make_inputs(45, 24, 301, torch.bfloat16, device, ignore=ignore,
                             bias=opt in ("all", "scale"))
    go = None
    if reduction == "none":
        go = torch.randn(45, generator=torch.Generator().manual_seed(1)).to(device)
    compare(ops.linear_cross_entropy, h, w, t, b, reduction=reduction, chunk_rows=16,
            grad_out=go, **kw)


@pytest.mark.parametrize("impl", ["op", "torch"])
@pytest.mark.parametrize("compact", [None, False])
def test_compaction_and_reference(device, impl, compact):
    fn = ops.linear_cross_entropy if impl == "op" else ops.torch_linear_cross_entropy
    h, w, t, b = make_inputs(97, 32, 515, torch.bfloat16, device, bias=True)
    compare(fn, h, w, t, b, chunk_rows=20, compact=compact, label_smoothing=0.1, z_loss=1e-3)
    compare(fn, h, w, t, b, reduction="none", chunk_rows=20, compact=compact,
            grad_out=torch.rand(97).to(device), softcap=3.0)


def test_fp32_master_weight_under_autocast(device):
    """bf16 activations, fp32 weight (master weights under autocast): GEMMs in bf16, dweight
    accumulated straight into an fp32 gradient (no bf16 rounding of it)."""
    h, w, t, _ = make_inputs(64, 32, 257, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _, dh, dw, _ = run_case(ops.linear_cross_entropy, h, w, t, None, chunk_rows=16)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    compare(ops.linear_cross_entropy, h.bfloat16(), w, t, None, chunk_rows=16,
            gemm_dtype=torch.bfloat16)
    loss2, _, dh2, dw2, _ = run_case(ops.linear_cross_entropy, h.bfloat16(), w, t, None,
                                     chunk_rows=16)
    assert torch.equal(loss, loss2) and torch.equal(dw, dw2)


def test_frozen_weight_and_hidden(device):
    h, w, t, b = make_inputs(40, 16, 200, torch.bfloat16, device, bias=True)
    _, _, dh, dw, db = run_case(ops.linear_cross_entropy, h, w, t, b, want=(True, False, False))
    assert dw is None and db is None and dh is not None
    _, _, dh, dw, db = run_case(ops.linear_cross_entropy, h, w, t, b, want=(False, True, True))
    assert dh is None and dw is not None and db is not None
    compare(ops.linear_cross_entropy, h, w, t, b)


def test_tied_weight(device):
    """The head weight is also the embedding: both gradients add up in weight.grad."""
    h, w, t, _ = make_inputs(30, 16, 90, torch.float32, device, ignore="none")
    ids = torch.randint(0, 90, (30,), generator=torch.Generator().manual_seed(3)).to(device)
    wt = w.detach().clone().requires_grad_()
    hid = torch.nn.functional.embedding(ids, wt) + h  # [30, 16]
    loss = ops.linear_cross_entropy(hid, wt, t)
    loss.backward()
    w64 = w.double().cpu().requires_grad_()
    hid64 = torch.nn.functional.embedding(ids.cpu(), w64) + h.double().cpu()
    rl, _, _ = ref_lce(hid64, w64, t.cpu(), gemm_dtype=torch.float32)
    rl.backward()
    check_rel(loss, rl)
    torch.testing.assert_close(wt.grad.double().cpu(), w64.grad, rtol=1e-5, atol=1e-7)


def test_leading_dims_and_errors(device):
    h, w, t, _ = make_inputs(24, 8, 50, torch.float32, device)
    loss = ops.linear_cross_entropy(h.view(4, 6, 8), w, t.view(4, 6), reduction="none")
    assert tuple(loss.shape) == (4, 6)
    out = ops.linear_cross_entropy(h.view(4, 6, 8), w, t.view(4, 6), return_lse=True)
    assert tuple(out.lse.shape) == (4, 6) and out.loss.dim() == 0
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="input features"):
        ops.linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match="targets shape"):
        ops.linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match="bias"):
        ops.linear_cross_entropy(h, w, t, torch.zeros(7, device=device))
    if torch.device(device).type == "cuda":
        return  # a bad target is a device-side assert there: test_cuda_bad_target_asserts
    bad = t.clone()
    bad[3] = 50
    with pytest.raises((RuntimeError, IndexError), match="out of range|outside|index"):
        ops.linear_cross_entropy(h, w, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bad_target_asserts():
    """On CUDA an out-of-range target stops the kernel with a device-side assert; it poisons the
    CUDA context, so it runs in a child process."""
    code = ("import torch, sftctl.ops as o\n"
            "h = torch.randn(24, 8, device='cuda'); w = torch.randn(50, 8, device='cuda')\n"
            "t = torch.randint(0, 50, (24,), device='cuda'); t[3] = 50\n"
            "o.linear_cross_entropy(h, w, t); torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "target out of range" in r.stdout + r.stderr, r.stdout + r.stderr


def test_deterministic(device):
    h, w, t, b = make_inputs(150, 32, 700, torch.bfloat16, device, bias=True)
    r1 = run_case(ops.linear_cross_entropy, h, w, t, b, chunk_rows=32, z_loss=1e-3,
                  return_lse=True)
    r2 = run_case(ops.linear_cross_entropy, h, w, t, b, chunk_rows=32, z_loss=1e-3,
                  return_lse=True)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([1, -100, 3, 8, 0, 2])
    for red in ("mean", "sum", "none"):
        fn = lambda h, w, b: ops.linear_cross_entropy(  # noqa: E731
            h, w, t, b, reduction=red, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
            logit_scale=0.8, chunk_rows=4)
        assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------ the op: opcheck, compile

LCE = torch.ops.sftctl.linear_cross_entropy.default


def lce_args(h, w, t, b=None, *, norm=None, gs=None, rs=None, red=1, eps=0.0, zl=0.0, cap=0.0,
             ls=1.0, lse=False, gh=False, gw=False, gb=False, compact=1, chunk=0):
    return (h, w, t, b, norm, gs, rs, -100, red, eps, zl, cap, ls, lse, gh, gw, gb, compact,
            chunk)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, reduction):
    h, w, t, b = make_inputs(9, 6, 23, torch.float32, device, bias=True)
    norm = torch.tensor(4.0, device=device) if reduction == 1 else None
    gs = torch.tensor(2.0, device=device)
    extra = dict(eps=0.1, zl=1e-3, cap=5.0, ls=0.9, lse=True, chunk=4)
    torch.library.opcheck(LCE, lce_args(h, w, t, b, norm=norm, gs=gs, red=reduction, **extra))
    torch.library.opcheck(LCE, lce_args(h, w, t, None, red=reduction, compact=0))
    flags = dict(gh=True, gw=True, gb=True) if reduction else {}
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    if reduction == 0:  # backward reruns the op: the full set, AOT dispatch included
        torch.library.opcheck(LCE, lce_args(hh, ww, t, bb, red=0, **extra))
    else:  # backward rescales the op's gradient outputs in place (see test_ops_checks.py)
        torch.library.opcheck(
            LCE, lce_args(hh, ww, t, bb, norm=norm, gs=gs, red=reduction, **flags, **extra),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(device, reduction):
    torch._dynamo.reset()
    h, w, t, b = make_inputs(50, 16, 97, torch.bfloat16, device, bias=True)

    def step(h, w, b, t):
        out = ops.linear_cross_entropy(h, w, t, b, reduction=reduction, z_loss=1e-3,
                                       softcap=8.0, return_lse=True, chunk_rows=16)
        loss = out.loss if reduction == "mean" else (out.loss * 0.5).sum()
        return loss, out.lse

    compiled = torch.compile(step, fullgraph=True)
    res = []
    for fn in (compiled, step):
        hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
        loss, lse = fn(hh, ww, bb, t)
        loss.backward()
        res.append((loss.detach(), lse, hh.grad, ww.grad, bb.grad))
    # the loss of 'none' is summed by the compiled graph's own reduction: close, not bitwise
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-6 if reduction == "none" else 0,
                               atol=0)
    for a, e in zip(res[0][1:], res[1][1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _gemm_count(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_skips_dweight_gemms(reduction):
    """3 chunks: forward GEMM + dhidden GEMM per chunk, plus a dweight GEMM per chunk only when
    the weight is trained ('none' recomputes the forward GEMM in backward)."""
    h, w, t, _ = make_inputs(60, 8, 40, torch.bfloat16, "cpu", ignore="none")
    fwd = 3 if reduction == "mean" else 6

    def run(train_w, train_h=True):
        hh = h.clone().requires_grad_(train_h)
        ww = w.clone().requires_grad_(train_w)
        loss = ops.linear_cross_entropy(hh, ww, t, reduction=reduction, chunk_rows=20).sum()
        loss.backward()

    assert _gemm_count(lambda: run(True)) == fwd + 3 + 3
    assert _gemm_count(lambda: run(False)) == fwd + 3
    assert _gemm_count(lambda: run(True, False)) == fwd + 3


def test_default_chunk_is_one_chunk_one_dweight_gemm():
    """A step's few rows fit the default chunk: one logits GEMM, one dhidden GEMM and one
    dweight GEMM (no pass per chunk over a dweight accumulator)."""
    h, w, t, _ = make_inputs(60, 8, 40, torch.bfloat16, "cpu", ignore="none")

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        ops.linear_cross_entropy(hh, ww, t).backward()

    assert _gemm_count(run) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_chunk_16bit_dweight_written_in_pieces(dtype):
    """A 16-bit weight whose rows fit one chunk: dweight comes from one GEMM, rounded into the
    weight's dtype in fp32 pieces of <= 256 MiB (here 16384 + 116 rows at d = 4096), never
    through a [V, d] fp32 accumulator; per element within the fp64 bound."""
    h, w, t, b = make_inputs(40, 4096, 16500, dtype, "cpu", bias=True)
    compare(ops.linear_cross_entropy, h, w, t, b, z_loss=1e-3)

    def run():  # logits, dhidden, and dweight in two pieces
        hh, ww = h[:4].clone().requires_grad_(), w.clone().requires_grad_()
        ops.linear_cross_entropy(hh, ww, t[:4]).backward()

    assert _gemm_count(run) == 4


def test_logits_in_pieces_inside_one_chunk():
    """V = 131072: the fp32 logits go through 1024-row pieces (512 MiB) inside one 1100-row chunk
    whose gradient is kept whole; the per-row losses, lse and row factors line up across the
    pieces (mean and 'none' with a random grad_output)."""
    h, w, t, _ = make_inputs(1100, 8, 131072, torch.bfloat16, "cpu")
    compare(ops.linear_cross_entropy, h, w, t, None, label_smoothing=0.1, return_lse=True)
    compare(ops.linear_cross_entropy, h, w, t, None, reduction="none",
            grad_out=torch.randn(1100, generator=torch.Generator().manual_seed(5)))


def test_compaction_skips_ignored_rows_gemm_rows():
    """30% of rows ignored: the GEMMs see only the kept rows (their shapes in the profile)."""
    h, w, t, _ = make_inputs(100, 8, 40, torch.float32, "cpu", ignore="none")
    t[:30] = -100
    for compact, rows in ((None, 70), (False, 100)):
        with torch.profiler.profile(record_shapes=True) as prof:
            ops.linear_cross_entropy(h, w.clone().requires_grad_(), t, compact=compact)
        shapes = [e.input_shapes for e in prof.events() if e.name == "aten::mm"]
        assert shapes and shapes[0][0] == [rows, 8], shapes


# ------------------------------------------------------------------------- CUDA-only cases


def _ref_large(h, w, t, chunk=1024, rows=None, cols=None):
    """float64 loss (sum over rows, mean) and, for sampled rows/vocab entries, the gradients of
    the mean loss, on the GPU in row chunks: (loss64, dh64[rows], dw64[cols], G-terms)."""
    w64 = w.double()  # [V, d]
    valid = t != -100
    n_valid = int(valid.sum())
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    dw = torch.zeros(len(cols), w.shape[1], dtype=torch.float64, device=h.device)
    dw_terms = torch.zeros_like(dw)
    dh, dh_terms = {}, {}
    for r0 in range(0, h.shape[0], chunk):
        h64 = h[r0:r0 + chunk].double()
        tc = t[r0:r0 + chunk]
        vc = tc != -100
        z = h64 @ w64.t()  # [chunk, V] float64
        lse = torch.logsumexp(z, 1)
        zt = z.gather(1, torch.where(vc, tc, 0)[:, None])[:, 0]
        total += torch.where(vc, lse - zt, 0.0).sum()
        p = torch.exp(z - lse[:, None])
        g = p.clone()
        g[torch.arange(len(tc), device=h.device), torch.where(vc, tc, 0)] -= 1.0
        g = g * (vc[:, None] / n_valid)
        terms = (p + (g < 0)) * (vc[:, None] / n_valid)  # p + [j == y], scaled
        dw += g[:, cols].t() @ h64
        dw_terms += terms[:, cols].t() @ h64.abs()
        for r in rows:
            if r0 <= r < r0 + chunk:
                dh[r] = g[r - r0] @ w64
                dh_terms[r] = terms[r - r0] @ w64.abs()
        del z, p, g, terms
    return total / n_valid, dh, dh_terms, dw, dw_terms


@_CUDA
def test_cuda_large_bf16_exact():
    """N=8192, d=4096, V=128256 bf16, 30% ignored: loss within 1e-5 of float64 on the same bf16
    inputs (observed ~1e-8), sampled dhidden rows and dweight rows per element."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    n, d, v = 8192, 4096, 128256
    h = torch.randn(n, d, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, d, device=dev, generator=g) * 0.03).bfloat16()
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    t[torch.rand(n, device=dev, generator=g) < 0.3] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hh, ww, t)
    loss.backward()
    rows = [1, 4097, n - 1] + [int(i) for i in torch.nonzero(t != -100)[:2, 0]]
    cols = [0, 17, v - 1] + [int(x) for x in t[t != -100][:3]]
    rl, dh, dh_terms, dw, dw_terms = _ref_large(h, w, t, rows=rows, cols=cols)
    rel = abs(loss.double().item() - rl.item()) / abs(rl.item())
    assert rel <= 1e-5, f"loss rel error {rel:.3e}"
    u = 2.0 ** -8
    for r in rows:
        err = (hh.grad[r].double() - dh[r]).abs()
        assert bool((err <= u * dh[r].abs() + (u + 2e-5) * dh_terms[r] + 1e-30).all()), r
    err = (ww.grad[cols].double() - dw).abs()
    assert bool((err <= u * dw.abs() + (u + 2e-5) * dw_terms + 1e-30).all())


@_CUDA
def test_cuda_graph_capture():
    """compact=None skips compaction under capture (no host sync); replaying the captured
    forward + backward on new data matches eager (which compacts)."""
    dev = "cuda"
    n, d, v = 512, 256, 32000
    h, w, t, _ = make_inputs(n, d, v, torch.bfloat16, dev)
    sh, st = h.clone(), t.clone()
    wp = w.clone().requires_grad_()
    hp = sh.clone().requires_grad_()

    def step():
        wp.grad = None
        hp.grad = None
        loss = ops.linear_cross_entropy(hp, wp, st, z_loss=1e-4)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    wp.grad = None
    hp.grad = None
    with torch.cuda.graph(graph):
        static_loss = ops.linear_cross_entropy(hp, wp, st, z_loss=1e-4)
        static_loss.backward()
    for seed in (1, 2):
        h2, _, t2, _ = make_inputs(n, d, v, torch.bfloat16, dev, seed=seed)
        with torch.no_grad():
            hp.copy_(h2)
        st.copy_(t2)
        graph.replay()
        torch.cuda.synchronize()
        loss, _, dh, dw, _ = run_case(ops.linear_cross_entropy, h2, w, t2, None, z_loss=1e-4)
        # eager compacts (other GEMM shapes): equal up to fp32 rounding before the bf16 one
        torch.testing.assert_close(static_loss, loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(hp.grad, dh, rtol=2 ** -7, atol=1e-7)
        torch.testing.assert_close(wp.grad, dw, rtol=2 ** -7, atol=1e-7)
        assert bool((hp.grad[t2 == -100] == 0).all())  # ignored rows: exactly 0


@_CUDA
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_cuda_no_full_logits(wdtype):
    """Peak extra memory of forward + backward stays at the chunk buffers + accumulators,
    far below one [N, V] logits tensor (bf16: N*V*2 bytes)."""
    dev = "cuda"
    n, d, v = 16384, 1024, 128256
    h, w, t, _ = make_inputs(n, d, v, torch.bfloat16, dev)
    w = w.to(wdtype)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ops.linear_cross_entropy(hh, ww, t)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # ~11.5k target rows do not fit one chunk (1.5 GiB + the 0.5 GiB fp32 accumulator it would
    # spare): chunks of 6272 rows (1.5 GiB of bf16 gradient) and 1024-row fp32 logits pieces
    from sftctl.ops.linear_ce_ref import OP_CHUNK_BYTES, OP_PIECE_BYTES

    rows = OP_CHUNK_BYTES // (2 * v) // 128 * 128  # 6272
    piece = OP_PIECE_BYTES // (4 * v) // 128 * 128  # 1024
    # a chunk's bf16 logits gradient + one fp32 logits piece; dweight in fp32; compacted hidden,
    # its dhidden and the scattered dhidden; a <= 256 MiB dweight GEMM piece (only if torch
    # refuses baddbmm's fp32 accumulation); cuBLAS workspaces; and a V x d bf16 copy (fp32
    # weight: the weight in the GEMM dtype; bf16 weight: the rounded gradient)
    budget = (rows * v * 2 + piece * v * 4 + v * d * 4 + n * d * 2 * 3
              + (256 << 20) + (128 << 20) + v * d * 2)
    assert extra <= budget, f"extra {extra / 2**30:.2f} GiB > budget {budget / 2**30:.2f} GiB"
    assert extra < n * v * 2, "as much memory as bf16 logits"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_chunk_peak_is_the_kept_gradient():
    """One chunk, bf16 [128256, 4096] weight: beyond the inputs and the returned gradients the
    op's peak is the kept bf16 logits gradient (2048 x V) and little else: the 512 MiB fp32
    logits piece is released before the dweight is allocated (and no fp32 accumulator)."""
    n, d, v = 2048, 4096, 128256
    h, w, t, _ = make_inputs(n, d, v, torch.bfloat16, "cuda", ignore="none")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.linear_cross_entropy(hh, ww, t).backward()
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - (n * d + v * d) * 2
    kept = n * v * 2
    # + cuBLAS workspaces and the small per-row buffers; the piece would add 1024 * v * 4 more
    assert beyond <= kept + (192 << 20), \
        f"{beyond / 2**20:.0f} MiB beyond the gradients, kept gradient {kept / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit_gradients_rounded_once_whatever_the_reduction_setting(dtype):
    """One chunk on CUDA: the logits GEMM, one dhidden GEMM and one dweight GEMM, the 16-bit
    gradients written by cuBLAS itself. Shapes with a long K (8192 rows into a 64 x 96 dweight,
    a 2048-long vocabulary into dhidden) invite split-K: the op must reduce its partial sums in
    fp32 whatever torch's reduced-precision setting says, so the gradients are the same bits
    with the setting on (torch's default) and off, and the setting is left as it was."""
    h, w, t, _ = make_inputs(8192, 64, 96, dtype, "cuda", ignore="none")
    h2, w2, t2, _ = make_inputs(64, 96, 2048, dtype, "cuda", ignore="none")
    name = ("allow_bf16_reduced_precision_reduction" if dtype == torch.bfloat16
            else "allow_fp16_reduced_precision_reduction")
    before = getattr(torch.backends.cuda.matmul, name)
    grads = {}
    try:
        for allow in (True, False):
            setattr(torch.backends.cuda.matmul, name, allow)
            out = []
            for hh, ww, tt in ((h, w, t), (h2, w2, t2)):
                hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
                ops.linear_cross_entropy(hh, ww, tt).backward()
                out += [hh.grad, ww.grad]
            assert getattr(torch.backends.cuda.matmul, name) == allow
            grads[allow] = out
    finally:
        setattr(torch.backends.cuda.matmul, name, before)
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
    compare(ops.linear_cross_entropy, h, w, t, None)
    compare(ops.linear_cross_entropy, h2, w2, t2, None)

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        ops.linear_cross_entropy(hh, ww, t).backward()

    assert _gemm_count(run) == 3


@pytest.mark.parametrize("cap", ["DEFAULT"])
def test_forced_cpu_capability_variants(cap):
    """The fp32-logits -> bf16-gradient CPU row loops of the baseline variant (AVX-512 is the
    default run here; AVX2 shares its vector width with AVX-512's code path structure and is
    left to tests/test_ops_checks.py's CE cases, to keep this file near a minute) pass the
    every-option cases in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_ops_checks import _supported_capabilities

    if cap not in _supported_capabilities():
        pytest.skip(f"this CPU does not run {cap}")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(repo / "tests" / "test_linear_ce.py"), "-k",
                        "test_options and cpu-all or test_shapes_dtypes and cpu-float16-333"],
                       env=env, capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "12 passed" in r.stdout, r.stdout[-500:]


def test_module_form(device):
    h, w, t, b = make_inputs(20, 8, 33, torch.float32, device, bias=True)
    mod = ops.LinearCrossEntropyLoss(reduction="sum", z_loss=1e-3, return_lse=True)
    assert "z_loss=0.001" in repr(mod)
    out = mod(h, w, t, b)
    ref = ops.linear_cross_entropy(h, w, t, b, reduction="sum", z_loss=1e-3, return_lse=True)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.lse, ref.lse)
