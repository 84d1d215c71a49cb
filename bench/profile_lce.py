"""Where the time of ``sftctl.ops.linear_cross_entropy`` goes at one shape (CUDA).

Two parts, in one process on one card:

1. The op's own kernels: one forward+backward under ``torch.profiler``, CUDA time summed by
   kernel family (GEMM, cross-entropy, copies, index ops, the rest), next to the three bf16 GEMMs
   it cannot avoid (the floor bench_cuda_lce.py uses).
2. The GEMM shapes the driver could use instead, timed alone: the logits GEMM whole vs in row
   pieces with fp32 output, the dweight GEMM with a bf16 output (cuBLAS rounding its fp32
   accumulator once, reduced-precision split-K reduction disallowed) vs fp32 pieces plus a
   rounding copy, the dhidden GEMM likewise.

    python bench/profile_lce.py --n 8192 --d 4096 --v 128256 --ignored 0.3 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optimizer import timed  # noqa: E402  (median of CUDA-event times)

REPS = 10


def family(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")):
        return "gemm"
    if "cross_entropy" in low or "ce_" in low or "sftctl" in low:
        return "cross-entropy"
    if "copy" in low or "convert" in low:
        return "copy/convert"
    if "index" in low or "nonzero" in low or "scatter" in low or "gather" in low:
        return "index"
    if "reduce" in low or "sum" in low:
        return "reduce"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--ignored", type=float, default=0.3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_lce.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    from sftctl import ops

    n, d, v = args.n, args.d, args.v
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[torch.rand(n, device="cuda", generator=g) < args.ignored] = -100
    m = int((t != -100).sum())
    result = {"shape": {"n": n, "d": d, "v": v, "trainable_rows": m,
                        "device": torch.cuda.get_device_name()}}

    def op_step():
        loss = ops.linear_cross_entropy(h, w, t)
        return torch.autograd.grad(loss, (h, w))

    result["op_ms"] = timed(op_step, REPS)
    from torch.profiler import ProfilerActivity, profile

    op_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op_step()
        torch.cuda.synchronize()
    by_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rec = by_kernel[e.name]
            rec[0] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else \
                e.cuda_time_total / 1e3
            rec[1] += 1
    fam = defaultdict(float)
    for name, (ms, _) in by_kernel.items():
        fam[family(name)] += ms
    result["op_kernels_ms"] = {k: round(v_, 3) for k, v_ in sorted(fam.items())}
    result["op_top_kernels"] = sorted(
        ({"name": k[:120], "ms": round(ms, 3), "calls": c} for k, (ms, c) in by_kernel.items()),
        key=lambda r: -r["ms"])[:14]

    hm = h.detach()[:m].contiguous()                           # [m, d]
    wd = w.detach()                                            # [V, d]
    gl = torch.randn(m, v, device="cuda", generator=g).bfloat16() * 1e-4  # [m, V] a gradient
    f32 = torch.float32
    alt = {}
    alt["fwd bf16 out, whole (floor)"] = timed(lambda: hm @ wd.t(), REPS)
    zall = torch.empty(m, v, device="cuda", dtype=f32)
    alt["fwd fp32 out, whole"] = timed(
        lambda: torch.mm(hm, wd.t(), out_dtype=f32, out=zall), REPS)
    del zall
    for rows in (512, 1024, 2048, 4096):
        buf = torch.empty(rows, v, device="cuda", dtype=f32)

        def fwd_pieces(rows=rows, buf=buf):
            for r0 in range(0, m, rows):
                r = min(rows, m - r0)
                torch.mm(hm[r0:r0 + r], wd.t(), out_dtype=f32, out=buf[:r])
        alt[f"fwd fp32 out, {rows}-row pieces"] = timed(fwd_pieces, REPS)
    alt["dh bf16 out (floor)"] = timed(lambda: gl @ wd, REPS)
    dh_tmp = torch.empty(m, d, device="cuda", dtype=f32)
    dh_out = torch.empty(m, d, device="cuda", dtype=torch.bfloat16)

    def dh_f32():
        torch.mm(gl, wd, out_dtype=f32, out=dh_tmp)
        dh_out.copy_(dh_tmp)
    alt["dh fp32 out + copy (op today)"] = timed(dh_f32, REPS)
    alt["dW bf16 out (floor, reduced-precision reduction allowed)"] = timed(
        lambda: gl.t() @ hm, REPS)
    prev = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    alt["dW bf16 out, reduced-precision reduction off"] = timed(lambda: gl.t() @ hm, REPS)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = prev
    piece = max(1, min(v, (256 << 20) // (4 * d)))
    dw_tmp = torch.empty(piece, d, device="cuda", dtype=f32)
    dw_out = torch.empty(v, d, device="cuda", dtype=torch.bfloat16)
    glt = gl.t()

    def dw_pieces():
        for v0 in range(0, v, piece):
            p = min(piece, v - v0)
            torch.mm(glt[v0:v0 + p], hm, out_dtype=f32, out=dw_tmp[:p])
            dw_out[v0:v0 + p].copy_(dw_tmp[:p])
    alt[f"dW fp32 {piece}-row pieces + copy (op today)"] = timed(dw_pieces, REPS)
    result["gemm_variants_ms"] = {k: round(x, 3) for k, x in alt.items()}
    ref = (gl.t().double() @ hm.double())
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    direct = gl.t() @ hm
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = prev
    dw_pieces()
    result["dW bf16-out equals fp32-then-round"] = bool(torch.equal(direct, dw_out))
    result["dW bf16-out rel L2 vs fp64"] = float((direct.double() - ref).norm() / ref.norm())
    text = json.dumps(result, indent=1)
    print(text)
    with open(os.path.join(args.out, f"profile_lce_{n}x{d}x{v}.json"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
