"""Forward+backward of the LM head matmul + cross-entropy on one GPU: sftctl's fused
linear_cross_entropy against the usual ways of computing it.

Run on the GPU machine (not a test):  python bench/bench_cuda_lce.py --out DIR
Writes DIR/bench_cuda_lce.json and DIR/bench_cuda_lce.md and prints the table.

Design choices
- One process, one GPU, one sitting. The matmul floor is measured in the same run: the three
  GEMMs a head needs (logits = h W^T, dh = dlogits W, dW = dlogits^T h) are timed with plain
  bf16 ``torch.mm`` on the trainable rows only (ignored rows need no matmul), and the floor is
  their summed time; the table also gives 6 * N_trainable * d * V FLOPs at that measured rate.
- Variants, each one training step's head part: forward to the loss, then the gradients of
  hidden and weight via ``torch.autograd.grad`` (what the rest of the backward consumes):
  sftctl (default chunking, and the same rows in two chunks), torch ``h @ W.T`` in bf16 + fp32
  cross-entropy (the usual eager code), ``torch.compile`` of that, Liger's
  ``LigerFusedLinearCrossEntropyFunction`` (default, and with fp32 dweight accumulation), and
  Apple's cut-cross-entropy (default gradient filtering, and filtering off) when importable.
  A variant that is not installed is reported as skipped, not hidden.
- Timing: CUDA events around each step, median of ``--reps`` after warm-up; two input sets
  alternate. Memory: peak allocated during one step minus what was allocated before it (the
  inputs), so the returned dh/dW count for every variant alike (2 x N x d + V x d bf16).
- Accuracy: the loss against float64 on the same bf16 values; dhidden on 64 sampled rows and
  dweight on 64 sampled vocabulary rows against float64, as the relative L2 error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

GiB = 1024**3


def timed(step, reps, warmup=3):
    for k in range(warmup):
        step(k)
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for k in range(reps):
        start[k].record()
        step(k)
        end[k].record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in zip(start, end)]
    return statistics.median(ms), ms


def gemm_floor(n_train, d, v, reps=10):
    """Summed time of the three bf16 GEMMs of a head on n_train rows, and the FLOP rate."""
    g = torch.Generator(device="cuda").manual_seed(7)
    h = torch.randn(n_train, d, device="cuda", generator=g).bfloat16()
    w = torch.randn(v, d, device="cuda", generator=g).bfloat16()
    dl = torch.randn(n_train, v, device="cuda", generator=g).bfloat16()
    fwd, _ = timed(lambda k: torch.mm(h, w.t()), reps)
    dh, _ = timed(lambda k: torch.mm(dl, w), reps)
    dw, _ = timed(lambda k: torch.mm(dl.t(), h), reps)
    total = fwd + dh + dw
    flops = 6.0 * n_train * d * v
    return {"fwd_ms": fwd, "dh_ms": dh, "dw_ms": dw, "floor_ms": total,
            "tflops": flops / (total * 1e-3) / 1e12}


def reference(h, w, t, rows, cols, chunk=1024):
    """float64 mean loss, dh on `rows`, dW on `cols` (gradients of the mean loss)."""
    w64 = w.double()
    valid = t != -100
    nv = max(int(valid.sum()), 1)
    total = 0.0
    lse_all = torch.zeros(h.shape[0], dtype=torch.float64, device="cuda")
    for i in range(0, h.shape[0], chunk):
        z = h[i:i + chunk].double() @ w64.t()  # [chunk, V]
        tc = t[i:i + chunk]
        vc = tc != -100
        lse = torch.logsumexp(z, 1)
        zt = z.gather(1, torch.where(vc, tc, 0)[:, None])[:, 0]
        total += float(torch.where(vc, lse - zt, 0.0).sum())
        lse_all[i:i + chunk] = lse
        del z
    # dh rows
    hr = h[rows].double()
    z = hr @ w64.t()
    g = torch.exp(z - lse_all[rows][:, None])
    tr = t[rows]
    vr = tr != -100
    g[torch.arange(len(rows), device="cuda"), torch.where(vr, tr, 0)] -= 1.0
    dh = (g * (vr[:, None] / nv)) @ w64
    # dW rows: sum over all rows n of (p[n, c] - [t_n == c]) h[n] / nv
    zc = h.double() @ w64[cols].t()  # [N, len(cols)]
    p = torch.exp(zc - lse_all[:, None]) * valid[:, None]
    p -= (t[:, None] == torch.tensor(cols, device="cuda")[None, :]).double()
    dw = (p.t() @ h.double()) / nv
    return total / nv, dh, dw


def make_variants(names):
    from sftctl import ops

    variants = {}

    def sftctl_step(chunk=None):
        def step(h, w, t):
            loss = ops.linear_cross_entropy(h, w, t, chunk_rows=chunk)
            return loss, torch.autograd.grad(loss, (h, w))
        return step

    variants["sftctl linear_cross_entropy"] = sftctl_step()
    variants["sftctl, two chunks"] = "two_chunks"

    def torch_step(h, w, t):
        logits = h @ w.t()  # [N, V] bf16
        loss = F.cross_entropy(logits.float(), t, ignore_index=-100)
        return loss, torch.autograd.grad(loss, (h, w))

    variants["torch bf16 logits + fp32 cross_entropy"] = torch_step
    compiled = torch.compile(
        lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100),
        dynamic=False)

    def compile_step(h, w, t):
        loss = compiled(h, w, t)
        return loss, torch.autograd.grad(loss, (h, w))

    variants["torch.compile of the above"] = compile_step
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as Liger)

        def liger_step(accum):
            def step(h, w, t):
                loss = Liger.apply(h, w, t, None, None, -100, 0.0, 0.0, "mean", None, False,
                                   accum)
                loss = loss[0] if isinstance(loss, tuple) else loss
                return loss, torch.autograd.grad(loss, (h, w))
            return step

        variants["liger FusedLinearCrossEntropy"] = liger_step(None)
        variants["liger FusedLinearCrossEntropy accum fp32"] = liger_step(torch.float32)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print(f"liger-kernel not available: {e!r}", file=sys.stderr)
        variants["liger FusedLinearCrossEntropy"] = f"skipped: {e!r}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        def cce_step(filter_eps):
            def step(h, w, t):
                loss = cce(h, w, t, filter_eps=filter_eps)
                return loss, torch.autograd.grad(loss, (h, w))
            return step

        variants["cut-cross-entropy (default grad filter)"] = cce_step("high")
        variants["cut-cross-entropy, filter off"] = cce_step(None)
    except Exception as e:  # noqa: BLE001
        print(f"cut-cross-entropy not available: {e!r}", file=sys.stderr)
        variants["cut-cross-entropy"] = f"skipped: {e!r}"
    if names:
        variants = {k: v for k, v in variants.items() if any(s in k for s in names)}
    return variants


def rel_l2(a, e):
    return float((a.double() - e).norm() / e.norm().clamp_min(1e-300))


def bench_shape(n, d, v, ignore_frac, variants, reps, seed=0):
    from sftctl.ops.linear_ce_ref import op_chunk_rows

    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(2):
        h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
        w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        t[torch.rand(n, device="cuda", generator=g) < ignore_frac] = -100
        sets.append((h, w, t))
    h0, w0, t0 = sets[0]
    n_train = int((t0 != -100).sum())
    floor = gemm_floor(n_train, d, v)
    rows = list(range(0, n, max(1, n // 64)))[:64]
    cols = sorted(set(list(range(0, v, max(1, v // 48)))[:48]
                      + [int(x) for x in t0[t0 != -100][:16]]))
    ref_loss, ref_dh, ref_dw = reference(h0, w0, t0, rows, cols)
    print(f"N={n} d={d} V={v} ignored {ignore_frac:.0%}: GEMM floor {floor['floor_ms']:.2f} ms "
          f"({floor['tflops']:.0f} TFLOP/s)", flush=True)
    out_rows = []
    # the op's default for these inputs (bf16 GEMMs, a bf16 weight that gets a gradient)
    default_rows = op_chunk_rows(v, n_train, gemm_bytes=2, spared_bytes=v * d * 4)
    half = max(1, (n_train + 1) // 2)
    from sftctl import ops

    # the returned dhidden and dweight (bf16) are counted in each variant's peak
    grad_bytes = (n * d + v * d) * 2
    for name, fn in variants.items():
        if isinstance(fn, str) and fn.startswith("skipped"):
            out_rows.append({"variant": name, "error": fn})
            continue
        if fn == "two_chunks":
            def fn(h, w, t, c=half):
                loss = ops.linear_cross_entropy(h, w, t, chunk_rows=c)
                return loss, torch.autograd.grad(loss, (h, w))
        leaves = [(h.clone().requires_grad_(), w.clone().requires_grad_(), t)
                  for h, w, t in sets]
        keep = [None] * len(leaves)

        def step(k, leaves=leaves, fn=fn, keep=keep):
            i = k % len(leaves)
            keep[i] = None
            loss, grads = fn(*leaves[i])
            keep[i] = (loss, grads)
            return loss

        try:
            step(0)
            loss, (dh, dw) = keep[0]
            err = abs(float(loss.detach()) - ref_loss) / abs(ref_loss)
            dh_err = rel_l2(dh[rows], ref_dh)
            dw_err = rel_l2(dw[cols], ref_dw)
            ms, all_ms = timed(step, reps)
            keep[:] = [None] * len(keep)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(0)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
        except Exception as e:  # noqa: BLE001 - OOM or a failing third-party kernel: reported
            print(f"  {name}: {type(e).__name__}: {e}", file=sys.stderr)
            out_rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            leaves = keep = None
            torch.cuda.empty_cache()
            continue
        out_rows.append({"variant": name, "ms": ms, "ms_min": min(all_ms), "ms_max": max(all_ms),
                         "x_floor": ms / floor["floor_ms"], "extra_bytes": extra,
                         "extra_gib": extra / GiB,
                         # the goal's measure: beyond the returned gradients too
                         "extra_beyond_grads_gib": (extra - grad_bytes) / GiB,
                         "loss_rel_err": err, "dh_rel_l2": dh_err,
                         "dw_rel_l2": dw_err})
        print(f"  {name:44s} {ms:8.2f} ms {ms / floor['floor_ms']:5.2f}x floor  extra "
              f"{extra / GiB:6.2f} GiB ({(extra - grad_bytes) / GiB:5.2f} beyond the "
              f"gradients)  loss err {err:.1e}  dh {dh_err:.1e}  dW {dw_err:.1e}",
              flush=True)
        leaves = keep = None
        torch.cuda.empty_cache()
    ours = next((r for r in out_rows if r["variant"] == "sftctl linear_cross_entropy"
                 and "ms" in r), None)
    if ours:
        for r in out_rows:
            if "ms" in r:
                r["sftctl_speedup"] = r["ms"] / ours["ms"]
    del sets
    torch.cuda.empty_cache()
    return {"n": n, "d": d, "v": v, "ignored_fraction": ignore_frac, "n_trainable": n_train,
            "dtype": "bfloat16", "chunk_rows_default": default_rows,
            "gemm": floor, "reference_loss": ref_loss, "rows": out_rows}


def markdown(result):
    lines = [f"# Linear + cross-entropy forward+backward on {result['device']} ({result['date']})",
             "", f"torch {result['torch']}, CUDA {result['cuda']}, liger-kernel "
             f"{result.get('liger_kernel')}, cut-cross-entropy {result.get('cut_cross_entropy')}; "
             f"bf16 hidden/weight, gradients of hidden and weight; floor = the three bf16 GEMMs "
             f"on the trainable rows, timed in the same run; median of {result['reps']} steps. "
             "Errors: loss relative to float64; dh/dW relative L2 on sampled rows.", ""]
    for s in result["shapes"]:
        gm = s["gemm"]
        lines += [f"## N={s['n']}, d={s['d']}, V={s['v']}, {s['ignored_fraction']:.0%} ignored "
                  f"(floor {gm['floor_ms']:.2f} ms = fwd {gm['fwd_ms']:.2f} + dh "
                  f"{gm['dh_ms']:.2f} + dW {gm['dw_ms']:.2f}; {gm['tflops']:.0f} TFLOP/s; "
                  f"sftctl chunk {s['chunk_rows_default']} rows)", "",
                  "| variant | ms | x floor | sftctl faster by | extra GiB | beyond grads GiB | "
                  "loss rel. err | dh rel. L2 | dW rel. L2 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            if "ms" not in r:
                lines.append(f"| {r['variant']} | {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['x_floor']:.2f} | "
                         f"{r.get('sftctl_speedup', float('nan')):.2f}x | {r['extra_gib']:.2f} | "
                         f"{r.get('extra_beyond_grads_gib', float('nan')):.2f} | "
                         f"{r['loss_rel_err']:.1e} | {r['dh_rel_l2']:.1e} | "
                         f"{r['dw_rel_l2']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default="8192x4096x128256x0.3,8192x4096x128256x0,"
                                        "8192x4096x262144x0.3",
                    help="comma-separated NxDxVxIGNORED_FRACTION")
    ap.add_argument("--variants", default="", help="comma-separated substrings to keep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_lce.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    import sftctl

    info = sftctl.extension_info()
    if not info.get("cuda"):
        sys.exit(f"sftctl._C has no CUDA kernels here: {info}")
    from importlib.metadata import version

    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "reps": args.reps, "shapes": []}
    for pkg in ("liger-kernel", "cut-cross-entropy"):
        try:
            result[pkg.replace("-", "_")] = version(pkg)
        except Exception:  # noqa: BLE001
            result[pkg.replace("-", "_")] = None
    variants = make_variants([s for s in args.variants.split(",") if s])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = ""
    for spec in args.shapes.split(","):
        n, d, v, ig = spec.split("x")
        result["shapes"].append(bench_shape(int(n), int(d), int(v), float(ig), variants,
                                            args.reps))
        # written after every shape, so a run cut short still leaves its numbers
        (out / "bench_cuda_lce.json").write_text(json.dumps(result, indent=1))
        md = markdown(result)
        (out / "bench_cuda_lce.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
