"""sftctl.ops.cross_entropy against a hand-written float64 PyTorch reference.

The reference (``ref_cross_entropy``) runs on the same input values (the low-precision logits
converted exactly to float64) and writes out lse, label smoothing, z-loss and softcap by hand;
its gradients come from float64 autograd. Criteria:
- loss (and lse): relative error <= 1e-6 against float64;
- gradient: per element (``check_grad``), the rounding to the logits' dtype plus a bound on fp32
  arithmetic relative to that element's own terms (``grad_terms``), so a wrong softmax tail fails
  even next to a large target entry (a max-based slack at V=50257 let 1% errors through).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sftctl
from sftctl import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, V): 1x1, odd V, V not a multiple of 16/32 lanes or of the 256-element block, a large vocab.
SHAPES = [(1, 1), (5, 123), (3, 50257), (17, 1000), (4, 16 * 17 + 5)]
IGNORE = ["none", "some", "all"]
OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 7.0},
    "extras": {"return_lse": True, "return_accuracy": True},
    "normalizer": {"normalizer": 37.0},
    "grad_scale": {"grad_scale": 1024.0},
    "inplace": {"inplace_backward": True},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "return_lse": True,
            "return_accuracy": True, "grad_scale": 8.0, "inplace_backward": True},
}
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(n, v, dtype, ignore, device, seed=0, scale=3.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed * 1000 + n * 7 + v)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        targets[torch.rand(n, generator=g) < 0.4] = ignore_index
        targets[0] = ignore_index
    elif ignore == "all":
        targets[:] = ignore_index
    return logits.to(device), targets.to(device)


def ref_cross_entropy(x64, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      normalizer=None, z_loss=0.0, softcap=None):
    """float64 reference: per-row loss, lse, correct, reduced loss (differentiable in x64)."""
    v = x64.shape[-1]
    z = softcap * torch.tanh(x64 / softcap) if softcap else x64
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    z_t = z.gather(-1, safe_t[:, None])[:, 0]
    row = (1 - label_smoothing) * (lse - z_t)
    if label_smoothing:  # (skipped at 0: -inf logits would give 0 * inf)
        row = row + label_smoothing * (lse - z.sum(-1) / v)
    row = row + z_loss * lse * lse
    row = torch.where(valid, row, torch.zeros_like(row))
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        div = float(normalizer) if normalizer is not None else float(valid.sum())
        loss = row.sum() / div if div != 0 else row.sum() * 0.0
    correct = (z.argmax(-1) == targets) & valid
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    return loss, lse.detach(), correct


def check_close_rel(actual, expected, rel=1e-6, abs_=1e-7, what="loss"):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    tol = rel * e.abs() + abs_
    assert bool((err <= tol).all()), (
        f"{what}: max error {err.max().item():.3e}, max rel {(err / e.abs().clamp_min(1e-30)).max().item():.3e}")


MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def ulp(x64, dtype):
    """Spacing of `dtype` numbers at each |x| (subnormal spacing below the normal range)."""
    _, e = torch.frexp(x64.abs())  # |x| = m * 2^e, m in [0.5, 1)
    e = torch.clamp(e - 1, min=MIN_EXP[dtype])
    return torch.ldexp(torch.ones_like(x64), e - MANTISSA_BITS[dtype])


# fp32 arithmetic of one gradient element, in units of u = 2^-24 of its terms (see check_grad);
# the CPU kernels (AVX-512, AVX2, default) reach 5.1 over this suite; 8 leaves room for CUDA.
ARITH_ULPS = 8.0
FP32_U = 2.0 ** -24
TINY = 2.0 ** -125  # ~2 of fp32's smallest normal: exp2 may flush a subnormal p to 0


def grad_terms(x64, targets, row_scale, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
               softcap=None):
    """Per element, the magnitudes fp32 arithmetic errors scale with, for ``check_grad``.

    The gradient is g = s * (p * (1 + 2 c lse) - eps / V - (1 - eps) [j == y]) * dcap.
    Returns (terms, expo, atol): terms = |s| * (p |1 + 2 c lse| + eps / V + (1 - eps) [j == y])
    (the sum its fp32 result cancels from; the dcap factor, 1 - tanh^2, is an absolute error on
    1); expo = 1 + |z| + |lse|, the relative error of p from an exponent rounded at that size;
    atol = TINY * (1 + |s| |1 + 2 c lse|) per row. ``row_scale`` is s per row ([N] or a number).
    Ignored rows get all zeros: their gradient must be exactly 0."""
    with torch.no_grad():
        x = x64.detach().double().cpu()
        n, v = x.shape
        t = targets.cpu()
        z = softcap * torch.tanh(x / softcap) if softcap else x
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
        p = torch.exp(z - lse)
        coef = (1 + 2 * z_loss * lse).abs()
        s = torch.as_tensor(row_scale, dtype=torch.float64).abs().reshape(-1, 1).expand(n, 1)
        valid = (t != ignore_index)[:, None]
        onehot = torch.zeros_like(x)
        safe = torch.where(valid[:, 0], t, 0)
        onehot[torch.arange(n), safe] = 1.0
        terms = s * (p * coef + label_smoothing / v + (1 - label_smoothing) * onehot)
        zf = torch.where(torch.isfinite(z), z, 0.0)  # p = 0 exactly at z = -inf
        expo = 1 + zf.abs() + torch.where(torch.isfinite(lse), lse, 0.0).abs()
        atol = TINY * (1 + s * coef)
        zero = torch.zeros_like(x)
        return (torch.where(valid, terms, zero), torch.where(valid, expo, zero),
                torch.where(valid, atol.expand(n, v), zero))


def grad_bound(expected64, dtype, terms, expo, atol, roundings=1, ulps=ARITH_ULPS):
    """Allowed |error| of each gradient element (see check_grad)."""
    e = expected64.detach().double().cpu()
    rounding = (0.5 if roundings == 1 else 1.5) * ulp(e, dtype)
    arith = ulps * FP32_U * (e.abs() * expo + terms)
    return rounding + arith + atol


def check_grad(actual, expected64, dtype, terms, expo, atol, what="grad", roundings=1,
               ulps=ARITH_ULPS):
    """Per-element gradient check against float64: |got - ref| <= rounding + arithmetic + atol.

    rounding: 0.5 ulp of `dtype` at the reference (the fused gradient is rounded once), 1.5 ulp
    for roundings=2 (reduction none with a per-row grad_output: rounded, rescaled by scale_grad_
    and rounded again, by design). arithmetic: ARITH_ULPS fp32 units of the element's own terms
    and exponent (grad_terms): relative to each element, so a tail entry of 1e-12 is held to
    ~1e-18, never to a slack taken from the row's largest entry. atol: denormal-sized.
    ``ulps`` replaces ARITH_ULPS for arithmetic known to be coarser (PyTorch's own fp32 path)."""
    a = actual.detach().double().cpu()
    e = expected64.detach().double().cpu()
    err = (a - e).abs()
    bound = grad_bound(e, dtype, terms, expo, atol, roundings, ulps)
    ok = err <= bound
    if not bool(ok.all()):
        i = int(torch.argmax(torch.where(ok, 0.0, err / bound.clamp_min(1e-300))))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), e.shape))
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {e.numel()} elements out of bounds; worst at {idx}: "
            f"got {a[idx].item():.9e}, want {e[idx].item():.9e}, error {err[idx].item():.3e} > "
            f"bound {bound[idx].item():.3e} (rel {err[idx].item() / abs(e[idx].item() or 1e-300):.2e})")


def run_case(n, v, dtype, ignore, opts, reduction, device, seed=0):
    scale = 10.0 if opts.get("softcap") else 3.0
    logits, targets = make_inputs(n, v, dtype, ignore, device, seed=seed, scale=scale)
    check_against_reference(logits, targets, opts, reduction)


def check_against_reference(logits, targets, opts, reduction, ignore_index=-100):
    """Loss, extras and gradient of ops.cross_entropy(logits, targets, **opts) vs float64."""
    opts = dict(opts)
    device, dtype = logits.device, logits.dtype
    n = logits.shape[0]
    normalizer = opts.pop("normalizer", None)
    grad_scale = opts.pop("grad_scale", None)
    kw = dict(opts)
    if normalizer is not None:
        kw["normalizer"] = torch.tensor(normalizer, device=device)
    if grad_scale is not None:
        kw["grad_scale"] = torch.tensor(grad_scale, device=device)

    x64 = logits.detach().double().cpu().requires_grad_()
    ref_loss, ref_lse, ref_correct = ref_cross_entropy(
        x64, targets.cpu(), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=opts.get("label_smoothing", 0.0), normalizer=normalizer,
        z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))
    # Backward weights: per-row for none; for mean/sum the loss scale when one is given (the
    # no-op path of scale_grad_), else 1.
    if reduction == "none":
        w = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    else:
        w = torch.tensor(grad_scale if grad_scale is not None else 1.0, dtype=torch.float64)
    ref_loss.backward(w)
    valid = (targets != ignore_index).cpu()
    div = 1.0
    if reduction == "mean":
        div = normalizer if normalizer is not None else int(valid.sum())
    row_scale = w / div if div else torch.zeros_like(w)
    terms = grad_terms(x64, targets, row_scale, ignore_index=ignore_index,
                       label_smoothing=opts.get("label_smoothing", 0.0),
                       z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))

    # In memory mode the logits are consumed: give the op its own leaf copy.
    leaf = logits.detach().clone().requires_grad_()
    inp = leaf * 1 if opts.get("inplace_backward") else leaf
    out = ops.cross_entropy(inp, targets, ignore_index=ignore_index, reduction=reduction, **kw)
    extras = opts.get("return_lse") or opts.get("return_accuracy")
    loss = out.loss if extras else out
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    check_close_rel(loss, ref_loss)
    if opts.get("return_lse"):
        check_close_rel(out.lse, ref_lse, what="lse")
    else:
        assert not extras or out.lse is None
    if opts.get("return_accuracy"):
        assert torch.equal(out.correct.cpu(), ref_correct), "correct (argmax == target)"
    else:
        assert not extras or out.correct is None
    loss.backward(w.float().to(device))
    assert leaf.grad.dtype == dtype
    check_grad(leaf.grad, x64.grad, dtype, *terms, roundings=2 if reduction == "none" else 1)
    if not bool(valid.any()):
        assert float(loss.detach().abs().sum()) == 0.0
        assert not bool(leaf.grad.any()), "all-ignored batch must give a zero gradient"
    assert not bool(leaf.grad.cpu()[~valid].any()), "ignored rows must have zero gradient"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_reference(dtype, shape, ignore, option, reduction, device):
    opts = OPTIONS[option]
    if "normalizer" in opts and reduction != "mean":
        logits, targets = make_inputs(*shape, dtype, ignore, device)
        with pytest.raises(RuntimeError, match="normalizer is only used with reduction='mean'"):
            ops.cross_entropy(logits, targets, reduction=reduction,
                              normalizer=torch.tensor(3.0, device=device))
        return
    run_case(*shape, dtype, ignore, opts, reduction, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_262144_loss_accuracy(dtype, device):
    """Long rows: fp32 lane sums + double block sums keep the loss within 1e-6 of float64."""
    run_case(2, 262144, dtype, "none", {"return_lse": True}, "none", device, seed=3)
    run_case(2, 262144, dtype, "none", {"label_smoothing": 0.1, "z_loss": 1e-3}, "mean", device,
             seed=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_cross_entropy(dtype, device):
    """Same numbers as F.cross_entropy on float64 logits, incl. label smoothing with ignores."""
    logits, targets = make_inputs(64, 999, dtype, "some", device, seed=1)
    for ls in (0.0, 0.3):
        for red in REDUCTIONS:
            got = ops.cross_entropy(logits, targets, reduction=red, label_smoothing=ls)
            want = F.cross_entropy(logits.double(), targets, reduction=red, label_smoothing=ls)
            check_close_rel(got, want)


def test_leading_dims_and_modules(device):
    logits, targets = make_inputs(24, 77, torch.bfloat16, "some", device, seed=2)
    l3, t3 = logits.view(2, 3, 4, 77), targets.view(2, 3, 4)
    out = ops.cross_entropy(l3, t3, reduction="none", return_lse=True, return_accuracy=True)
    assert out.loss.shape == out.lse.shape == out.correct.shape == (2, 3, 4)
    flat = ops.cross_entropy(logits, targets, reduction="none")
    assert torch.equal(out.loss.reshape(-1), flat)
    mod = sftctl.ops.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    assert "label_smoothing=0.1" in repr(mod)
    want = ops.cross_entropy(logits, targets, label_smoothing=0.1, z_loss=1e-4)
    assert torch.equal(mod(l3, t3), want)
    with pytest.raises(ValueError, match="targets shape"):
        ops.cross_entropy(l3, targets)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(logits, targets, reduction="avg")


def test_no_grad_skips_gradient(device):
    logits, targets = make_inputs(8, 300, torch.float32, "some", device)
    _, _, _, grad = torch.ops.sftctl.cross_entropy(logits, targets, None, None, -100, 1, 0.0, 0.0,
                                                   0.0, False, False, False)
    assert grad.shape == (0,)
    leaf = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = ops.cross_entropy(leaf, targets)
    assert not loss.requires_grad


def test_custom_ignore_index_and_grad_output(device):
    logits, targets = make_inputs(9, 50, torch.float32, "none", device, seed=7)
    targets[::3] = 7  # class 7 is also a valid class elsewhere: ignore_index is any value
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, ignore_index=7, reduction="sum")
    (loss * 3.5).backward()
    x = logits.double().requires_grad_()
    ref = F.cross_entropy(x, targets, ignore_index=7, reduction="sum")
    (ref * 3.5).backward()
    check_close_rel(loss, ref)
    check_grad(leaf.grad, x.grad, torch.float32,
               *grad_terms(logits, targets, 3.5, ignore_index=7))


def test_retain_graph_backward_twice(device):
    logits, targets = make_inputs(6, 40, torch.float32, "some", device, seed=8)
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        loss = ops.cross_entropy(leaf * 1 if inplace else leaf, targets, reduction="none",
                                 inplace_backward=inplace)
        w1 = torch.arange(1.0, 7.0, device=device)
        g1, = torch.autograd.grad(loss, leaf, w1, retain_graph=True)
        g2, = torch.autograd.grad(loss, leaf, 2 * w1)
        torch.testing.assert_close(g2, 2 * g1)


def test_grad_scale_zero_divisor_and_normalizer_zero(device):
    logits, targets = make_inputs(5, 33, torch.float32, "some", device)
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, normalizer=torch.tensor(0.0, device=device))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not bool(leaf.grad.any())


def test_extension_info():
    info = sftctl.extension_info()
    assert info["built"] and info["cpu"] and info["error"] is None
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    assert info["cuda"] == (info["cuda_compiled"] and torch.cuda.is_available())
    # the SFTCTL_CE_* plan knobs exist only in a CUDA build asked for with SFTCTL_CE_TUNING=1
    assert isinstance(info["ce_tuning"], bool)
    assert not info["ce_tuning"] or info["cuda_compiled"]


def test_all_options_combinations_small(device):
    """Every subset of the options at once on one odd shape (fast), each against the reference."""
    flags = ["label_smoothing", "z_loss", "softcap", "return_lse", "inplace_backward", "grad_scale"]
    values = {"label_smoothing": 0.15, "z_loss": 2e-3, "softcap": 6.0, "return_lse": True,
              "inplace_backward": True, "grad_scale": 4.0}
    for k in range(len(flags) + 1):
        for combo in itertools.combinations(flags, k):
            opts = {f: values[f] for f in combo}
            run_case(7, 67, torch.bfloat16, "some", opts, "mean", device, seed=k)
