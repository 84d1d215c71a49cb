"""AdamW step on split master weights (``sftctl.ops.adamw_split_``) against torch's fused AdamW on
fp32 weights, side by side on one GPU, on the Linear weights of a model shape (issue 14: the
optimizer is ~10% of the 1B step).

What each variant must move per weight (bytes): torch fused fp32: read w, g, m, v (16) + write
w, m, v (12) = 28, plus autocast's cast of the weight in every forward (read 4 + write 2) and
the gradient's cast back in backward (read 2 + write 4) that the split layout never does; split:
read weight, low, g (6) + m, v (8), write weight, low, m, v (12) = 26. The "floor" column is
those bytes at the device-to-device copy bandwidth measured in the same run. The model's fp32
parameters outside the Linear layers (the embedding and the norm weights) are timed too, with
torch's fused AdamW and with the same op's whole-fp32 layout (28 bytes per weight either way),
and the gradient norm over all gradients (torch's per-dtype multi-tensor norms against
``sftctl.ops.sum_squares``; the floor there is one read of every gradient, counted at the copy
bandwidth, which a read-only pass can beat).

    python bench/bench_optimizer.py --out OUT [--shape 1b|8b] [--steps 20]

Writes OUT/optimizer_<card>_<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
from pathlib import Path

import torch

SHAPES = {  # (hidden, intermediate, layers, heads, kv_heads, vocab) of Llama-3.2-1B / 3.1-8B
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}


def linear_shapes(name: str) -> list[tuple[int, int]]:
    h, inter, layers, heads, kv, _vocab = SHAPES[name]
    d = h // heads
    per_layer = [(h, h), (kv * d, h), (kv * d, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return per_layer * layers


def timed(fn, steps: int) -> float:
    """Median milliseconds of ``fn`` over ``steps`` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth(numel: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from sftctl.ops import adamw_split_
    from sftctl.ops.split_master import join_fp32, split_fp32

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = linear_shapes(args.shape)
    numel = sum(a * b for a, b in shapes)
    bw = copy_bandwidth(256 * 2**20)
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    # torch: fp32 weights and gradients, fused AdamW
    ws = [torch.nn.Parameter(torch.randn(s, device=dev, generator=g) * 0.02) for s in shapes]
    for w in ws:
        w.grad = torch.randn(w.shape, device=dev, generator=g).to(torch.bfloat16).float() * 1e-3
    opt = torch.optim.AdamW(ws, fused=True, **kw)
    torch_ms = timed(opt.step, args.steps)
    masters = [w.detach().clone() for w in ws]
    grads16 = [w.grad.to(torch.bfloat16) for w in ws]
    del opt, ws
    torch.cuda.empty_cache()

    # what autocast adds per step for fp32 weights: one cast per weight in the forward, one
    # cast of the bf16 gradient back to fp32 in backward
    casts_fwd = timed(lambda: [m.to(torch.bfloat16) for m in masters], args.steps)
    casts_bwd = timed(lambda: [x.float() for x in grads16], args.steps)

    # split: bf16 weights + int16 lows, bf16 gradients, fp32 moments
    halves = [split_fp32(m) for m in masters]
    weights = [h for h, _l in halves]
    lows = [lo for _h, lo in halves]
    m1 = [torch.zeros_like(m) for m in masters]
    m2 = [torch.zeros_like(m) for m in masters]
    state = {"step": 0}

    def split_step():
        state["step"] += 1
        adamw_split_(weights, lows, grads16, m1, m2, lr=kw["lr"], beta1=kw["betas"][0],
                     beta2=kw["betas"][1], eps=kw["eps"], weight_decay=kw["weight_decay"],
                     step=state["step"])

    split_ms = timed(split_step, args.steps)
    # the split step is the fp32 step: compare one step from the same state on a few tensors
    check = []
    for i in range(min(3, len(shapes))):
        p = torch.nn.Parameter(masters[i].clone())
        p.grad = grads16[i].float()
        o = torch.optim.AdamW([p], fused=True, **kw)
        o.step()
        w16, lo = split_fp32(masters[i])
        a, b = torch.zeros_like(masters[i]), torch.zeros_like(masters[i])
        adamw_split_([w16], [lo], [grads16[i]], [a], [b], lr=kw["lr"], beta1=kw["betas"][0],
                     beta2=kw["betas"][1], eps=kw["eps"], weight_decay=kw["weight_decay"], step=1)
        diff = (join_fp32(w16, lo) - p.detach()).abs().max().item()
        check.append(diff / p.detach().abs().max().item())

    del halves, weights, lows, m1, m2, masters, grads16
    torch.cuda.empty_cache()

    # whole fp32 masters (the embedding, tied to the head in the 1B shape, and the norm
    # weights): torch's fused AdamW against the same op's whole layout, on the same tensors
    h, vocab = SHAPES[args.shape][0], SHAPES[args.shape][5]
    whole_shapes = [(vocab, h)] + [(h,)] * (2 * SHAPES[args.shape][2] + 1)
    whole_numel = sum(math.prod(s) for s in whole_shapes)
    wp = [torch.nn.Parameter(torch.randn(s, device=dev, generator=g) * 0.02)
          for s in whole_shapes]
    for w in wp:
        w.grad = torch.randn(w.shape, device=dev, generator=g) * 1e-3
    opt = torch.optim.AdamW(wp, fused=True, **kw)
    whole_torch_ms = timed(opt.step, args.steps)
    del opt
    wm1 = [torch.zeros_like(w) for w in wp]
    wm2 = [torch.zeros_like(w) for w in wp]
    state["step"] = 0

    def whole_step():
        state["step"] += 1
        adamw_split_([w.data for w in wp], [None] * len(wp), [w.grad for w in wp], wm1, wm2,
                     lr=kw["lr"], beta1=kw["betas"][0], beta2=kw["betas"][1], eps=kw["eps"],
                     weight_decay=kw["weight_decay"], step=state["step"])

    whole_ms = timed(whole_step, args.steps)
    del wm1, wm2

    # the gradient norm for clipping over all of them (bf16 Linear gradients + fp32 others):
    # torch's multi-tensor norms per dtype (what the trainer ran before) against sum_squares
    from sftctl.ops import sum_squares
    from sftctl.training.foreach import foreach_norms

    all_grads = [torch.randn(s, device=dev, generator=g).to(torch.bfloat16) for s in shapes]
    all_grads += [w.grad for w in wp]
    norm_bytes = sum(t.numel() * t.element_size() for t in all_grads)

    def norm_foreach():
        return torch.linalg.vector_norm(
            torch.stack(foreach_norms(all_grads, 2.0, dtype=torch.float32)), 2.0)

    norm_foreach_ms = timed(norm_foreach, args.steps)
    norm_ours_ms = timed(lambda: sum_squares(all_grads).sqrt(), args.steps)
    ref_norm = math.sqrt(sum(float(t.double().square().sum()) for t in all_grads))
    norm_rel_err = {"foreach": abs(float(norm_foreach()) - ref_norm) / ref_norm,
                    "sum_squares": abs(float(sum_squares(all_grads).sqrt()) - ref_norm) / ref_norm}
    del wp, all_grads
    torch.cuda.empty_cache()

    floor_torch = numel * 28 / bw * 1e3
    floor_split = numel * 26 / bw * 1e3
    card = torch.cuda.get_device_name(dev)
    rows = [
        {"variant": "torch fused AdamW, fp32 weights and gradients", "ms": torch_ms,
         "floor_ms": floor_torch},
        {"variant": "  + autocast's weight casts (forward)", "ms": casts_fwd,
         "floor_ms": numel * 6 / bw * 1e3},
        {"variant": "  + gradient casts to fp32 (backward)", "ms": casts_bwd,
         "floor_ms": numel * 6 / bw * 1e3},
        {"variant": "sftctl adamw_split_ (bf16 weight + low half, bf16 gradients)",
         "ms": split_ms, "floor_ms": floor_split},
        {"variant": f"whole fp32 ({whole_numel:,} params: embedding + norms), torch fused",
         "ms": whole_torch_ms, "floor_ms": whole_numel * 28 / bw * 1e3},
        {"variant": "whole fp32, the same, sftctl adamw_split_ (whole layout)",
         "ms": whole_ms, "floor_ms": whole_numel * 28 / bw * 1e3},
        {"variant": "gradient norm of all, torch _foreach_norm per dtype + vector_norm",
         "ms": norm_foreach_ms, "floor_ms": norm_bytes / bw * 1e3},
        {"variant": "gradient norm of all, sftctl sum_squares + sqrt",
         "ms": norm_ours_ms, "floor_ms": norm_bytes / bw * 1e3},
    ]
    res = {"date": _dt.date.today().isoformat(), "card": card, "torch": torch.__version__,
           "shape": args.shape, "tensors": len(shapes), "parameters": numel,
           "copy_bandwidth_Bps": bw, "rows": rows,
           "split_vs_torch_max_rel_diff_one_step": max(check),
           "per_step_ms_fp32_path": torch_ms + casts_fwd + casts_bwd,
           "per_step_ms_split_path": split_ms,
           "grad_norm_rel_err_vs_float64": norm_rel_err}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"optimizer_{card.replace(' ', '_')}_{args.shape}_{res['date']}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"{card}, {args.shape}: {len(shapes)} Linear weights, {numel:,} parameters, copy "
          f"{bw / 1e12:.2f} TB/s")
    for r in rows:
        print(f"  {r['variant']:<64} {r['ms']:8.3f} ms  (floor {r['floor_ms']:.3f})")
    print(f"  fp32 path per step {res['per_step_ms_fp32_path']:.3f} ms, split "
          f"{split_ms:.3f} ms; one-step max rel diff vs torch {max(check):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
