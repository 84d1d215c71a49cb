"""CPU benchmark: forward+backward of sftctl.ops.cross_entropy vs torch, on bf16 logits.

Compared in one process, on the same inputs (30% of targets ignored):
- ``sftctl``          sftctl.ops.cross_entropy(logits, targets) (fused: the forward writes the
                      gradient, backward is a no-op rescale)
- ``sftctl_inplace``  the same with inplace_backward=True (memory mode, gradient over the logits)
- ``torch_bf16``      F.cross_entropy(logits, targets) on the bf16 logits
- ``upcast_fp32``     DeepSpeed-Chat's path: F.cross_entropy(logits.float(), targets)

Time: median wall time of ``--repeat`` runs after ``--warmup`` runs, each run = forward + backward
(the gradient lands in a leaf's .grad, bf16, like in training).
Peak extra memory: the process' resident-set high-water mark during one run minus the resident
set right before it (Linux: /proc/self/clear_refs resets the mark, /proc/self/status VmHWM reads
it). N x V buffers are far above glibc's mmap threshold, so they are returned to the OS when freed
and each run starts from the same baseline. The figure includes the gradient the run produces
(N x V bf16 in every method except memory mode, where it reuses the logits' buffer).

Usage: python bench/bench_cpu_ce.py [--shapes 2048x32000,4096x50257] [--repeat 5]
Writes bench/results/cpu_ce_<host>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sftctl
from sftctl import ops

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_sftctl(logits, targets):
    x = logits.detach().requires_grad_()
    ops.cross_entropy(x, targets).backward()
    return x.grad


def run_sftctl_inplace(logits, targets):
    # Memory mode consumes its input: feed it a fresh non-leaf copy, as a model's lm_head output
    # would be. The copy is made before the timer starts (see measure()).
    x, y = logits
    ops.cross_entropy(y, targets, inplace_backward=True).backward()
    return x.grad


def run_torch_bf16(logits, targets):
    x = logits.detach().requires_grad_()
    F.cross_entropy(x, targets).backward()
    return x.grad


def run_upcast_fp32(logits, targets):
    x = logits.detach().requires_grad_()
    F.cross_entropy(x.float(), targets).backward()
    return x.grad


METHODS = {
    "sftctl": run_sftctl,
    "sftctl_inplace": run_sftctl_inplace,
    "torch_bf16": run_torch_bf16,
    "upcast_fp32": run_upcast_fp32,
}


def _prepare(name, logits):
    if name != "sftctl_inplace":
        return logits
    leaf = logits.detach().clone().requires_grad_()
    with torch.no_grad():
        pass
    y = leaf.view_as(leaf)  # a non-leaf alias of a fresh buffer: the op may overwrite it
    return (leaf, y)


def measure(name, logits, targets, warmup, repeat):
    fn = METHODS[name]
    times, peaks = [], []
    for i in range(warmup + repeat):
        inp = _prepare(name, logits)
        gc.collect()
        have_peak = _reset_peak()
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        grad = fn(inp, targets)
        t1 = time.perf_counter()
        peak = _status_kb("VmHWM") - base if have_peak else None
        del grad, inp
        if i >= warmup:
            times.append(t1 - t0)
            peaks.append(peak)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "runs_ms": [round(1e3 * t, 2) for t in times],
            "peak_extra_mb": None if peaks[0] is None else max(peaks) / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x32000,4096x50257")
    ap.add_argument("--ignore", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    info = sftctl.extension_info()
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": info["cpu_capability"], "loadavg_before": os.getloadavg(),
        "ignore_fraction": args.ignore, "warmup": args.warmup, "repeat": args.repeat,
        "memory": "peak RSS (VmHWM after clear_refs) minus RSS before the run, MB",
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sftctl kernels "
          f"{info['cpu_capability']}, load avg {meta['loadavg_before'][0]:.2f}")
    results = []
    for shape in args.shapes.split(","):
        n, v = (int(s) for s in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, v, generator=g) * 2).to(torch.bfloat16)  # [N, V] bf16
        targets = torch.randint(0, v, (n,), generator=g)
        targets[torch.rand(n, generator=g) < args.ignore] = -100
        row = {"N": n, "V": v, "methods": {}}
        for name in args.methods.split(","):
            row["methods"][name] = measure(name, logits, targets, args.warmup, args.repeat)
        base = row["methods"].get("sftctl")
        print(f"\nN={n} V={v} ({args.ignore:.0%} ignored), forward+backward:")
        print(f"  {'method':<16}{'median ms':>10}{'min ms':>9}{'peak extra MB':>15}"
              f"{'sftctl speedup':>16}")
        for name, m in row["methods"].items():
            ratio = m["median_ms"] / base["median_ms"] if base else float("nan")
            m["sftctl_speedup"] = ratio
            peak = "n/a" if m["peak_extra_mb"] is None else f"{m['peak_extra_mb']:.0f}"
            print(f"  {name:<16}{m['median_ms']:>10.1f}{m['min_ms']:>9.1f}{peak:>15}"
                  f"{ratio:>15.2f}x")
        results.append(row)
        del logits
    meta["loadavg_after"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS / (
        f"cpu_ce_{platform.node()}_{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
