"""Forward+backward of the LM cross-entropy on one GPU: sftctl against the kernels people use.

Run on the GPU machine (not a test):  python bench/bench_cuda_ce.py --out DIR
Writes DIR/bench_cuda_ce.json and DIR/bench_cuda_ce.md and prints the table.

Design choices
- Everything in one process and one sitting: the device-to-device copy bandwidth (bytes read +
  bytes written over the time of a large ``copy_``) is measured first and gives each shape's floor
  = (one read of the logits + one write of the gradient) / copy bandwidth.
- Variants, each timed as one training step's loss part (forward, then backward to the logits):
  sftctl (public API, functional mode; optionally other kernel plans through the SFTCTL_CE_*
  knobs), sftctl memory mode (the two ops its autograd Function
  runs: ``cross_entropy_`` then ``scale_grad_``, which is a no-op for grad_output 1), Liger's
  ``LigerCrossEntropyLoss`` (if importable), ``torch.compile`` of the fp32 cross-entropy,
  ``F.cross_entropy`` on the bf16 logits, and DeepSpeed-Chat's ``logits.float()`` +
  ``F.cross_entropy``.
- Each step ends with the gradient w.r.t. the logits in hand (``torch.autograd.grad``), which is
  what the lm_head backward consumes; ``.backward()`` on a leaf would add AccumulateGrad's copy.
- Timing: CUDA events around each step, median of ``--reps`` after warm-up; inputs rotate among
  two sets so no step finds its logits in L2. Memory: peak allocated during one step minus what
  was allocated before it, with no earlier gradient alive (so the produced gradient buffer
  counts, as in the issue's anchors).
- Accuracy: each variant's loss against a float64 reference of the same bf16 values.
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


def backward(loss, x):
    """Gradient of the loss w.r.t. the logits, as the lm_head backward would consume it.

    torch.autograd.grad instead of loss.backward(): the logits here are a leaf standing in for
    the lm_head output, and AccumulateGrad would add a copy that no training step pays.
    """
    return torch.autograd.grad(loss, x)[0]


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


def peak_extra(step, reset):
    reset()  # drop every gradient left from earlier steps, so none is counted as freed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(nbytes=4 * GiB, reps=20):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms, _ = timed(lambda k: dst.copy_(src), reps)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3), ms  # bytes read + bytes written per second


def reference_loss(logits, targets, chunk=1024):
    total, count = 0.0, 0
    for i in range(0, logits.shape[0], chunk):
        x = logits[i:i + chunk].double()
        t = targets[i:i + chunk]
        valid = t != -100
        lse = torch.logsumexp(x, -1)
        zt = x.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        total += float(torch.where(valid, lse - zt, 0.0).sum())
        count += int(valid.sum())
    return total / count


def with_env(fn, env):
    """Run fn with extra environment (a SFTCTL_CE_TUNING build reads SFTCTL_CE_* at every call)."""
    def wrapped(*args):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return wrapped


def make_variants(names, env_variants):
    from sftctl import ops

    variants = {}

    def sftctl_step(x, t):
        loss = ops.cross_entropy(x, t)
        return loss, backward(loss, x)

    def sftctl_memory_step(x, t, _one=[]):
        # What ops.cross_entropy(..., inplace_backward=True) runs: the gradient overwrites x in
        # forward; backward is scale_grad_ with grad_output 1, a device-side no-op.
        if not _one:
            _one.append(torch.ones((), device="cuda"))
        loss, _, _ = torch.ops.sftctl.cross_entropy_(x, t, None, None, -100, 1, 0.0, 0.0, 0.0,
                                                      False, False)
        torch.ops.sftctl.scale_grad_(x, _one[0], None)
        return loss, x

    variants["sftctl"] = (sftctl_step, True)
    variants["sftctl memory mode"] = (sftctl_memory_step, False)
    for spec in env_variants:  # other plans of the same op (kernel variant, slice size), for the notes
        env = dict(kv.split("=", 1) for kv in spec.split(","))
        variants[f"sftctl [{spec}]"] = (with_env(sftctl_step, env), True)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss(ignore_index=-100)

        def liger_step(x, t):
            loss = liger(x, t)
            return loss, backward(loss, x)

        variants["liger-kernel LigerCrossEntropyLoss"] = (liger_step, True)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print(f"liger-kernel not available: {e!r}", file=sys.stderr)

    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100),
                             dynamic=False)

    def compile_step(x, t):
        loss = compiled(x, t)
        return loss, backward(loss, x)

    def bf16_step(x, t):
        loss = F.cross_entropy(x, t, ignore_index=-100)
        return loss, backward(loss, x)

    def deepspeed_step(x, t):
        loss = F.cross_entropy(x.float(), t, ignore_index=-100)
        return loss, backward(loss, x)

    variants["torch.compile fp32 cross_entropy"] = (compile_step, True)
    variants["F.cross_entropy on bf16"] = (bf16_step, True)
    variants["DeepSpeed-Chat logits.float() + F.cross_entropy"] = (deepspeed_step, True)
    if names:
        variants = {k: v for k, v in variants.items() if any(n in k for n in names)}
    return variants


def bench_shape(n, v, variants, bw, reps, ignore_frac=0.3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(2):
        x = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16) * 2
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        t[torch.rand(n, device="cuda", generator=g) < ignore_frac] = -100
        sets.append((x, t))
    ref = reference_loss(*sets[0])
    nbytes = n * v * 2
    floor_ms = 2 * nbytes / bw * 1e3
    # the honest floor: only rows with a target must be read (an ignored row's gradient is
    # zeros, written without reading its logits); the whole gradient must be written
    kept = int((sets[0][1] != -100).sum())
    honest_ms = (kept * v * 2 + nbytes) / bw * 1e3
    rows = []
    for name, (fn, needs_leaf) in variants.items():
        leaves = [(x.detach().clone().requires_grad_(needs_leaf), t) for x, t in sets]
        grads = [None] * len(leaves)  # the last gradient of each input set, kept like .grad

        def step(k, leaves=leaves, fn=fn, grads=grads):
            x, t = leaves[k % len(leaves)]
            grads[k % len(leaves)] = None
            loss, grads[k % len(leaves)] = fn(x, t)
            return loss

        def reset(grads=grads):
            grads[:] = [None] * len(grads)

        try:
            first = step(0)
            err = abs(float(first.detach()) - ref) / abs(ref)
            ms, all_ms = timed(step, reps)
            extra = peak_extra(step, reset)
        except torch.OutOfMemoryError as e:
            print(f"{name} N={n} V={v}: out of memory ({e})", file=sys.stderr)
            rows.append({"variant": name, "error": "out of memory"})
            del leaves
            torch.cuda.empty_cache()
            continue
        rows.append({"variant": name, "ms": ms, "ms_min": min(all_ms), "ms_max": max(all_ms),
                     "x_floor": ms / floor_ms, "x_honest_floor": ms / honest_ms,
                     "extra_bytes": extra,
                     "extra_gib": extra / GiB, "loss_rel_err": err,
                     "loss_dtype": str(first.dtype).replace("torch.", "")})
        print(f"  {name:50s} {ms:8.3f} ms  {ms / floor_ms:5.2f}x floor  "
              f"{ms / honest_ms:5.2f}x honest  "
              f"extra {extra / GiB:6.2f} GiB  rel err {err:.1e}", flush=True)
        del leaves
        torch.cuda.empty_cache()
    ours = next((r for r in rows if r["variant"] == "sftctl" and "ms" in r), None)
    if ours:
        for r in rows:
            if "ms" in r:
                r["sftctl_speedup"] = r["ms"] / ours["ms"]
    del sets
    torch.cuda.empty_cache()
    return {"n": n, "v": v, "ignored_fraction": ignore_frac, "dtype": "bfloat16",
            "logits_bytes": nbytes, "floor_ms": floor_ms, "rows_with_target": kept,
            "honest_floor_ms": honest_ms, "reference_loss": ref, "rows": rows}


def markdown(result):
    lines = [f"# Cross-entropy forward+backward on {result['device']} ({result['date']})", "",
             f"torch {result['torch']}, CUDA {result['cuda']}; device-to-device copy "
             f"{result['copy_tb_s']:.2f} TB/s (read + write); floor = (one read of the bf16 "
             f"logits + one write of the gradient) / copy bandwidth; honest floor = (one read "
             f"of the rows with a target + one write of the gradient) / copy bandwidth; "
             f"median of {result['reps']} steps.", ""]
    for s in result["shapes"]:
        lines += [f"## N={s['n']}, V={s['v']}, {int(round(s['ignored_fraction'] * 100))}% "
                  f"ignored (floor {s['floor_ms']:.3f} ms, honest floor "
                  f"{s.get('honest_floor_ms', float('nan')):.3f} ms)", "",
                  "| variant | ms | x floor | x honest floor | sftctl faster by | extra memory GiB | loss rel. err vs fp64 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            if "ms" not in r:
                lines.append(f"| {r['variant']} | {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['x_floor']:.2f} | "
                         f"{r.get('x_honest_floor', float('nan')):.2f} | "
                         f"{r.get('sftctl_speedup', float('nan')):.2f}x | {r['extra_gib']:.2f} | "
                         f"{r['loss_rel_err']:.1e} ({r['loss_dtype']}) |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--shapes", default="8192x128256,8192x32000,8192x151936,8192x262144,"
                                        "16384x128256")
    ap.add_argument("--variants", default="", help="comma-separated substrings to keep")
    ap.add_argument("--ignored", default="0.3",
                    help="comma-separated fractions of ignored targets, each shape at each "
                         "(issue 14's honest-floor goal: 0,0.3,0.5)")
    ap.add_argument("--sftctl-env", default="",
                    help="extra sftctl plans to time, ';'-separated, each KEY=VAL[,KEY=VAL] of "
                         "SFTCTL_CE_* knobs (e.g. 'SFTCTL_CE_SLICE_KB=48;SFTCTL_CE_KERNEL=global')")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_ce.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    bw, copy_ms = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"{dev}: D2D copy {bw / 1e12:.2f} TB/s ({copy_ms:.3f} ms for 4 GiB)", flush=True)
    import sftctl

    if args.sftctl_env and not sftctl.extension_info().get("ce_tuning"):
        sys.exit("--sftctl-env needs sftctl._C built with SFTCTL_CE_TUNING=1 (a production build "
                 "ignores the SFTCTL_CE_* knobs)")
    variants = make_variants([s for s in args.variants.split(",") if s],
                             [k for k in args.sftctl_env.split(";") if k])
    result = {"device": dev, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "copy_bytes_per_s": bw,
              "copy_tb_s": bw / 1e12, "reps": args.reps, "shapes": []}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        result["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        result["liger_kernel"] = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fracs = [float(f) for f in args.ignored.split(",") if f.strip()]
    for spec in args.shapes.split(","):
        n, v = (int(x) for x in spec.split("x"))
        for frac in fracs:
            print(f"N={n} V={v} ignored {frac:.0%}", flush=True)
            result["shapes"].append(bench_shape(n, v, variants, bw, args.reps,
                                                ignore_frac=frac))
        # written after every shape, so a run cut short still leaves its numbers
        (out / "bench_cuda_ce.json").write_text(json.dumps(result, indent=1))
        md = markdown(result)
        (out / "bench_cuda_ce.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
