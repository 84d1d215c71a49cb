"""Causal attention kernels that `sftctl train` can reach on one GPU, timed side by side
(issue 14: attention is the second-largest item of a 1B training step after the GEMMs:
bench/results/profile_*.md).

    python bench/bench_attention.py --out OUT            # the GPU machine

For each layout, forward + backward of one attention layer at the trainer's shapes:
- full rows: B rows of T tokens, one causal sequence per row (workload (a) of bench_e2e);
- packed rows: the first B rows of bench_e2e's workload (b) (its skewed lengths, its packing),
  attention never crossing a document.
Shapes: the Llama-3.2-1B attention (32 query heads, 8 key/value heads, head size 64) and the
Llama-3.1-8B one (32/8, head size 128). Backends (each skipped with its error when it does not
run here): torch's varlen_attn (flash kernels; what the trainer uses today for both layouts),
SDPA with each of its backends pinned (flash, cuDNN, memory-efficient; full rows only), cuDNN's
ragged attention through ``aten::_cudnn_attention_forward`` (packed), flex attention compiled
with a causal / document block mask.

Reported per backend: median ms of forward+backward over ``--reps`` runs (CUDA events), the
attention TFLOP/s that implies (causal FLOPs only: 4 * sum(L^2)/2 * H * D forward, 2.5x that
backward), and the largest difference of the output and of dq against the varlen kernel's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e as e2e  # noqa: E402  (same folder: workload (b)'s lengths and packing)


def packed_rows(rows: int, seq: int) -> list[list[int]]:
    """Document lengths of the first ``rows`` packed rows of bench_e2e's workload (b): its
    skewed examples (same count and seed) packed by its copy of sftctl's first-fit rule."""
    import numpy as np

    ex = e2e.make_examples("skewed", 1600, seq, 128256, seed=11)
    lengths = np.array([len(x["ids"]) for x in ex])
    return [[int(lengths[i]) for i in row]
            for row in e2e.plan_rows(lengths, seq, packing=True, seed=1)[:rows]]


def time_fb(fn, q, k, v, reps: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median ms of out = fn(q, k, v); out.backward(g); plus out and dq of the last run (the
    same g for every backend: a generator seeded from the shape)."""
    gen = torch.Generator(device=q.device).manual_seed(q.numel())
    g = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=gen)
    ms = []
    for i in range(reps + 3):
        for t in (q, k, v):
            t.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn(q, k, v)
        out.backward(g)
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            ms.append(a.elapsed_time(b))
    ms.sort()
    return ms[len(ms) // 2], out.detach(), q.grad.detach().clone()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--head-dims", default="64,128")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from sftctl.training.attention import _torch_varlen

    dev = torch.device("cuda")
    B, T, Hq, Hkv = args.rows, args.seq, 32, 8
    flex = torch.compile(flex_attention, dynamic=False)
    results = []
    packed = packed_rows(B, T)
    for D in [int(x) for x in args.head_dims.split(",")]:
        for layout in ("full", "packed"):
            docs = [[T]] * B if layout == "full" else packed
            seg = []  # every document, then each row's padding tail as a segment of its own
            for r in docs:
                seg += r + ([T - sum(r)] if sum(r) < T else [])
            cu = torch.tensor([0] + seg, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
            max_len = max(seg)
            flops_fwd = 4 * sum(n * n / 2 for n in seg) * Hq * D
            torch.manual_seed(0)
            q0 = torch.randn(B * T, Hq, D, device=dev, dtype=torch.bfloat16)
            k0 = torch.randn(B * T, Hkv, D, device=dev, dtype=torch.bfloat16)
            v0 = torch.randn(B * T, Hkv, D, device=dev, dtype=torch.bfloat16)
            doc_id = torch.repeat_interleave(torch.arange(len(seg), device=dev),
                                             torch.tensor(seg, device=dev)).view(B, T)

            def varlen(q, k, v):  # exactly the trainer's call (window, GQA, scale handling)
                return _torch_varlen(q, k, v, cu, max_len, D ** -0.5, None)

            def bhtd(fn):  # [B*T, H, D] <-> [B, H, T, D]
                def run(q, k, v):
                    o = fn(*(x.view(B, T, -1, D).transpose(1, 2) for x in (q, k, v)))
                    return o.transpose(1, 2).reshape(B * T, Hq, D)
                return run

            def sdpa(backend, gqa=True):
                def f(q, k, v):
                    if not gqa:
                        k = k.repeat_interleave(Hq // Hkv, dim=1)
                        v = v.repeat_interleave(Hq // Hkv, dim=1)
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=gqa)
                return bhtd(f)

            def cudnn_ragged(q, k, v):
                k = k.repeat_interleave(Hq // Hkv, dim=1)
                v = v.repeat_interleave(Hq // Hkv, dim=1)
                return _CudnnRagged.apply(q, k, v, cu, max_len)

            def doc_causal(b, h, qi, ki):
                return (qi >= ki) & (doc_id[b, qi] == doc_id[b, ki])

            mask = create_block_mask(doc_causal, B, None, T, T, device=dev)

            def flex_fn(q, k, v):
                return flex(q, k, v, block_mask=mask, enable_gqa=True)

            cands = [("torch varlen_attn (flash)", varlen)]
            if layout == "full":
                cands += [("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION)),
                          ("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
                          ("sdpa cudnn, k/v repeated", sdpa(SDPBackend.CUDNN_ATTENTION, False)),
                          ("sdpa memory-efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION))]
            else:
                cands += [("cudnn ragged (k/v repeated)", cudnn_ragged)]
            cands += [("flex_attention (compiled, block mask)", bhtd(flex_fn))]
            ref_out = ref_dq = None
            for name, fn in cands:
                q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
                row = {"head_dim": D, "layout": layout, "backend": name, "B": B, "T": T,
                       "Hq": Hq, "Hkv": Hkv, "segments": len(seg)}
                try:
                    ms, out, dq = time_fb(fn, q, k, v, args.reps)
                except Exception as e:  # a backend that does not run here is a row, not a crash
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    results.append(row)
                    print(f"D={D} {layout:6s} {name:40s} error: {row['error']}", flush=True)
                    continue
                if ref_out is None:
                    ref_out, ref_dq = out, dq
                row.update(ms=round(ms, 4), tflops=round(3.5 * flops_fwd / ms / 1e9, 1),
                           out_maxdiff=float((out.float() - ref_out.float()).abs().max()),
                           dq_maxdiff=float((dq.float() - ref_dq.float()).abs().max()))
                results.append(row)
                print(f"D={D} {layout:6s} {name:40s} {ms:7.3f} ms  {row['tflops']:6.1f} TFLOP/s  "
                      f"out diff {row['out_maxdiff']:.1e} dq diff {row['dq_maxdiff']:.1e}",
                      flush=True)
    card = torch.cuda.get_device_name(0)
    stamp = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attention_{card.replace(' ', '_')}_{stamp}.json"
    path.write_text(json.dumps({"card": card, "date": stamp, "torch": torch.__version__,
                                "command": " ".join(sys.argv), "results": results}, indent=1))
    print("wrote", path)
    return 0


class _CudnnRagged(torch.autograd.Function):
    """cuDNN's ragged (cumulative-length) attention on the flat ``[N, H, D]`` tensors, forward
    and backward, equal head counts (the layout torch's own varlen cuDNN path uses)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, cq, ck, mq, mk, seed, off, _ = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, off)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, cu, seed, off = ctx.saved_tensors
        m = ctx.max_len
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            g.contiguous(), q, k, v, out, lse, seed, off, torch.empty(0, device=q.device),
            cu, cu, m, m, 0.0, True)
        return dq, dk, dv, None, None


if __name__ == "__main__":
    sys.exit(main())
