"""The GEMMs of one decoder layer at a step's token count, separate vs fused projections
(issue 14: how far a 1B step's GEMMs are from the card's GEMM rate, and whether fusing q/k/v
and gate/up into one matmul each would buy anything).

For each Linear of a Llama layer (q, k, v, o, gate, up, down) the three GEMMs a training step
runs on it (forward ``y = x W^T``, ``dx = dy W``, ``dW = dy^T x``) are timed one by one with
cuBLAS (bf16 in, bf16 out, fp32 accumulation: what autocast runs), and then with q/k/v as one
``[q+k+v, h]`` weight and gate/up as one ``[2i, h]`` weight. The reference rate is a large
square GEMM (8192^3) in the same process. The head's three GEMMs are timed at the same token
count for the step's trained rows.

    python bench/bench_gemm_shapes.py --out OUT [--shape 1b|8b] [--tokens 8192]

Writes OUT/gemm_shapes_<card>_<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import torch

from bench_optimizer import timed  # median ms of CUDA events (bench/ is on sys.path)

SHAPES = {  # (hidden, intermediate, layers, heads, kv_heads, vocab) of Llama-3.2-1B / 3.1-8B
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}


def three_gemms_ms(tokens: int, out_f: int, in_f: int) -> dict:
    """Forward, dx and dW of one Linear ``[out_f, in_f]`` on ``tokens`` rows."""
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)       # [T, in]
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)        # [out, in]
    dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)     # [T, out]
    flops = 2 * tokens * out_f * in_f
    fwd = timed(lambda: x @ w.t(), 20)                                       # [T, out]
    dx = timed(lambda: dy @ w, 20)                                           # [T, in]
    dw = timed(lambda: dy.t() @ x, 20)                                       # [out, in]
    return {"shape": [out_f, in_f], "fwd_ms": fwd, "dx_ms": dx, "dw_ms": dw,
            "total_ms": fwd + dx + dw, "flops": 3 * flops,
            "tflops": 3 * flops / ((fwd + dx + dw) / 1e3) / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--trained-fraction", type=float, default=0.7,
                    help="share of the tokens with a target (the head's rows)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    h, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    d = h // heads
    t = args.tokens

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / (timed(lambda: a @ b, 20) / 1e3) / 1e12
    del a, b

    separate = {name: three_gemms_ms(t, o, i) for name, (o, i) in {
        "q": (h, h), "k": (kv * d, h), "v": (kv * d, h), "o": (h, h),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter)}.items()}
    fused = {"qkv": three_gemms_ms(t, h + 2 * kv * d, h),
             "gate_up": three_gemms_ms(t, 2 * inter, h)}
    rows = int(t * args.trained_fraction)
    head = three_gemms_ms(rows, vocab, h)

    sep_ms = sum(r["total_ms"] for r in separate.values())
    fused_ms = (fused["qkv"]["total_ms"] + separate["o"]["total_ms"]
                + fused["gate_up"]["total_ms"] + separate["down"]["total_ms"])
    layer_flops = sum(r["flops"] for r in separate.values())
    out = {
        "date": _dt.date.today().isoformat(), "card": torch.cuda.get_device_name(),
        "torch": torch.__version__, "shape": args.shape, "tokens": t,
        "peak_tflops_8192cube": peak,
        "layer": {"separate": separate, "fused": fused,
                  "separate_ms": sep_ms, "fused_ms": fused_ms,
                  "floor_ms_at_peak": layer_flops / (peak * 1e12) * 1e3},
        "model": {"layers": layers, "separate_ms": sep_ms * layers, "fused_ms": fused_ms * layers,
                  "floor_ms_at_peak": layers * layer_flops / (peak * 1e12) * 1e3},
        "head": head | {"rows": rows},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name().replace(" ", "_")
    path = Path(args.out) / f"gemm_shapes_{card}_{out['date']}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"{out['card']}  8192^3 GEMM {peak:.0f} TFLOP/s; {args.shape}, {t} tokens")
    print(f"{'linear':<8}{'shape':>14}{'fwd ms':>9}{'dx ms':>9}{'dW ms':>9}{'TFLOP/s':>9}")
    for name, r in list(separate.items()) + list(fused.items()) + [("head", head)]:
        print(f"{name:<8}{str(tuple(r['shape'])):>14}{r['fwd_ms']:>9.3f}{r['dx_ms']:>9.3f}"
              f"{r['dw_ms']:>9.3f}{r['tflops']:>9.0f}")
    m = out["model"]
    print(f"model GEMMs (excl. head): separate {m['separate_ms']:.1f} ms, fused q/k/v + gate/up "
          f"{m['fused_ms']:.1f} ms, at the 8192^3 rate {m['floor_ms_at_peak']:.1f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
