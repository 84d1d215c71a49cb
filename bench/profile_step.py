"""Where the time of one ``sftctl train`` step goes: a torch.profiler trace of a few steps of
bench_e2e's workloads, summed by kernel category (issue 14: finding the road from 1.05x to 1.3x
the best plain-HF loop on full rows).

    python bench/profile_step.py --out OUT --workload a            # GPU (the device machine)
    python bench/profile_step.py --out /tmp/p --workload b --smoke # tiny model on the CPU

Writes OUT/profile_<workload>_<card>_<date>.json and .md: per category (GEMM, attention,
sftctl loss kernels, optimizer, Triton (compiled blocks), copies/casts, other) the device time
per step and its share of the step's wall time, the GPU-idle share (wall minus the sum of
kernel times, when kernels do not overlap), and the 25 kernels with the most time.

Design choices
- The run is the real trainer, in process (``Trainer.setup`` then ``Trainer.train``), with the
  config the CLI builds from the same flags as bench_e2e's sftctl runner; its ``train_step`` is
  wrapped so the profiler covers whole steps (``--skip`` steps first: compilation and warm-up).
- Categories come from kernel names (cuBLAS/CUTLASS GEMMs, flash/varlen attention, sftctl's
  ``ce_*`` and ``sft_labels`` kernels, fused AdamW, ``triton_*`` from torch.compile); the raw
  names are kept in the JSON so a category can be re-cut later.
- The profiled steps run back to back as in training (one sync before the window and one after;
  ``--sync-each-step`` syncs after every step, which starves the start of each step and inflates
  the idle share). The step wall time is the window's over the steps.
- Idle gaps: on the GPU the device intervals of all kernels, copies and memsets are merged, and
  every gap of at least ``--gap-us`` between two of them is attributed to the pair (kernel
  before, kernel after): the table says where in the step the device waits for the host.
- On the CPU (``--smoke``) there are no kernels: the same table is made from the self CPU time
  of the aten ops, which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e as e2e  # noqa: E402  (same folder: model shapes, data, FLOPs)

CATEGORIES = [  # first match wins (Triton before the optimizer: "triton_poi_fused_..." names)
    ("optimizer", r"adamw_split|sum_squares"),  # sftctl's AdamW step and gradient norm
    # (before "sftctl" below)
    ("sftctl loss (ce/labels)", r"ce_forward|ce_prep|ce_finalize|scale_grad|sft_labels|sftctl"),
    ("attention", r"flash|fmha|varlen|attention|attn|sdpa|_efficient_|dot_do_o|convert_dq"),
    ("triton (compiled)", r"^triton_|triton"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|wgmma|\bmm\b|addmm|matmul|linear|bmm"),
    ("optimizer", r"adam|multi_tensor|foreach|_fused_"),
    ("copies/casts", r"copy|cast|to_copy|fill|memset|memcpy|index|gather|scatter|cat\b"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def sftctl_argv(wl: dict, args, out: Path) -> list[str]:
    argv = ["train", "--model", wl["model"], "--data", wl["data"]["jsonl"], "--output-dir",
            str(out), "--overwrite", "--no-eval", "--no-initial-eval", "--quiet",
            "--allow-missing-weights", "--max-seq-len", str(args.seq_len), "--batch-size",
            str(args.batch_size), "--max-steps", str(args.skip + args.steps + 1), "--lr", "1e-5",
            "--seed", "1", "--device", "cpu" if args.smoke else "cuda", "--save-every", "0"]
    argv += ["--packing"] if wl["packing"] else []
    argv += ["--gradient-checkpointing"] if wl["ckpt"] else []
    argv += ["--precision", "fp32"] if args.smoke else []
    return argv + args.extra


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity

    from sftctl.run import cli
    from sftctl.run.plugin_manager import get_plugin_manager
    from sftctl.training.trainer import Trainer

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    wls = e2e.prepare(work, args)
    wl = wls[args.workload]
    pm = get_plugin_manager(entry_points=False)
    parser = cli.build_parser(pm, pm.config_options())
    argv = sftctl_argv(wl, args, work / f"run_{args.workload}")
    cfg = cli.resolve_config(parser.parse_args(argv), pm, pm.config_options())
    trainer = Trainer(cfg, pm)
    trainer.setup()
    window: dict = {}
    collections: list[tuple[int, float]] = []  # (generation, seconds) inside the window
    gc_start = {}

    def gc_timer(phase, info):
        if "t0" not in window or "t1" in window:
            return
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            collections.append((info["generation"], time.perf_counter() - gc_start.pop("t")))
    on_gpu = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    prof = torch.profiler.profile(activities=acts, record_shapes=False)
    step, calls, walls, host = trainer.train_step, [], [], []

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def wrapped(rows_list):
        calls.append(1)
        n = len(calls)
        if n == args.skip + 1:
            sync()
            prof.start()
            window["t0"] = time.perf_counter()
        t0 = time.perf_counter()
        out = step(rows_list)
        if args.skip < n <= args.skip + args.steps:
            host.append(time.perf_counter() - t0)  # the host's time in the call (no sync)
            if args.sync_each_step or n == args.skip + args.steps:
                sync()  # the profiled window ends with the device idle
            walls.append(time.perf_counter() - t0)
            if n == args.skip + args.steps:
                walls[:] = [(time.perf_counter() - window["t0"]) / args.steps] * args.steps
                window["t1"] = time.perf_counter()
                prof.stop()
        return out

    trainer.train_step = wrapped
    gc.callbacks.append(gc_timer)
    try:
        trainer.train()
    finally:
        gc.callbacks.remove(gc_timer)
    if len(walls) < args.steps:
        raise SystemExit(f"only {len(walls)} profiled steps ran (of {args.steps})")
    rows = []
    for ev in prof.key_averages():
        if on_gpu:
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0)
            if not t or str(getattr(ev, "device_type", "")).endswith("CPU"):
                continue
            if "#" in ev.key:  # a record_function range (Optimizer.step#AdamW.step): its
                continue       # kernels are counted on their own rows already
        else:
            t = ev.self_cpu_time_total
            if not t or not ev.key.startswith("aten::"):
                continue
        rows.append({"name": ev.key, "count": ev.count, "us": float(t),
                     "category": category(ev.key)})
    n = args.steps
    wall_ms = 1e3 * sum(walls) / n
    busy_ms = sum(r["us"] for r in rows) / 1e3 / n
    cats: dict[str, float] = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["us"] / 1e3 / n
    tokens = [h["tokens"] for h in trainer.state.history if h["kind"] == "train"]
    gaps = None
    if on_gpu:
        gaps = idle_gaps(device_intervals(prof), args.gap_us, n)
        gaps["largest_with_host"] = host_during(gaps.pop("largest"), host_intervals(prof))
    return {"date": datetime.date.today().isoformat(),
            "card": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "torch": torch.__version__, "workload": args.workload, "argv": argv,
            "profiled_steps": n, "skipped_steps": args.skip,
            "step_wall_ms": round(wall_ms, 3), "kernel_ms_per_step": round(busy_ms, 3),
            "idle_share": round(max(0.0, 1 - busy_ms / wall_ms), 4) if on_gpu else None,
            "tokens_per_step": tokens[args.skip:args.skip + n],
            "categories_ms_per_step": {k: round(v, 3) for k, v in
                                       sorted(cats.items(), key=lambda kv: -kv[1])},
            "compiled": trainer.compiled, "loss_head": trainer.head_info,
            "sync_each_step": args.sync_each_step, "idle_gaps": gaps,
            "host_ms_per_step": sorted(round(1e3 * h, 2) for h in host),
            "gc_in_window": {f"gen{g}": {"count": sum(1 for c in collections if c[0] == g),
                                         "ms": round(1e3 * sum(t for c in collections
                                                               if c[0] == g for t in [c[1]]), 3)}
                             for g in (0, 1, 2)},
            "kernels": sorted(rows, key=lambda r: -r["us"])[:200]}


def device_intervals(prof) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of every device-side event of the trace."""
    from torch.autograd import DeviceType

    out = []
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA and ev.time_range.end > ev.time_range.start:
            out.append((float(ev.time_range.start), float(ev.time_range.end), ev.name))
    return out


def host_intervals(prof) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of the host-side events: ops, autograd nodes, CUDA runtime
    calls (cudaLaunchKernel, cudaFree, cudaEventSynchronize, ...)."""
    from torch.autograd import DeviceType

    return [(float(ev.time_range.start), float(ev.time_range.end), ev.name)
            for ev in prof.events() if ev.device_type == DeviceType.CPU
            and ev.time_range.end > ev.time_range.start]


def host_during(gaps: list[tuple[float, float, str, str]],
                host: list[tuple[float, float, str]]) -> list[dict]:
    """For each gap, the innermost host event that covers most of it (what the host was busy
    with while the device waited) and the host events that start inside it."""
    out = []
    for start, end, before, after in gaps:
        length = end - start
        covering = [h for h in host if min(h[1], end) - max(h[0], start) >= 0.8 * length]
        inner = min(covering, key=lambda h: h[1] - h[0]) if covering else None
        starting = sorted({h[2] for h in host if start <= h[0] < end})[:8]
        out.append({"gap_us": round(length, 1), "before": before, "after": after,
                    "host_innermost": inner[2] if inner else None,
                    "host_innermost_us": round(inner[1] - inner[0], 1) if inner else None,
                    "host_started_inside": starting})
    return out


def idle_gaps(intervals: list[tuple[float, float, str]], min_us: float, steps: int) -> dict:
    """Merge the device intervals; every gap >= min_us between two merged runs is charged to
    (last kernel to finish before it, first kernel after it). Returns the total idle inside the
    window per step, the gaps' count, and the pairs with the most idle (ms per step)."""
    ivs = sorted(intervals)
    pairs: dict[tuple[str, str], list[float]] = {}
    every: list[tuple[float, float, str, str]] = []
    total = small = 0.0
    if ivs:
        end, last = ivs[0][1], ivs[0][2]
        for start, stop, name in ivs[1:]:
            gap = start - end
            if gap > 0:
                total += gap
                if gap >= min_us:
                    key = (_short(last), _short(name))
                    pairs.setdefault(key, []).append(gap)
                    every.append((end, start, key[0], key[1]))
                else:
                    small += gap
            if stop > end:
                end, last = stop, name
    top = sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:20]
    return {"min_gap_us": min_us,
            "idle_ms_per_step": round(total / 1e3 / steps, 3),
            "in_small_gaps_ms_per_step": round(small / 1e3 / steps, 3),
            "gaps_per_step": round(sum(len(v) for v in pairs.values()) / steps, 1),
            "top": [{"before": b, "after": a, "count": len(v),
                     "ms_per_step": round(sum(v) / 1e3 / steps, 3),
                     "largest_us": round(max(v), 1)} for (b, a), v in top],
            "largest": sorted(every, key=lambda g: g[0] - g[1])[:8]}


def _short(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


def markdown(r: dict) -> str:
    what = "kernel" if r["idle_share"] is not None else "aten op (CPU self time)"
    lines = [f"# Profile of `sftctl train`, workload ({r['workload']}), {r['card']}, {r['date']}",
             "", f"torch {r['torch']}; {r['profiled_steps']} steps profiled after "
             f"{r['skipped_steps']}; step wall {r['step_wall_ms']:.1f} ms, {what} time "
             f"{r['kernel_ms_per_step']:.1f} ms per step"
             + (f", idle {100 * r['idle_share']:.1f}%" if r["idle_share"] is not None else "")
             + f"; compiled: {r['compiled']}.", "",
             "| category | ms per step | share of the step |", "|---|---:|---:|"]
    for k, v in r["categories_ms_per_step"].items():
        lines.append(f"| {k} | {v:.2f} | {100 * v / r['step_wall_ms']:.1f}% |")
    lines += ["", f"Top {what}s:", "", "| name | category | calls per step | ms per step |",
              "|---|---|---:|---:|"]
    n = r["profiled_steps"]
    for k in r["kernels"][:25]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"| `{name}` | {k['category']} | {k['count'] / n:.0f} | "
                     f"{k['us'] / 1e3 / n:.2f} |")
    if r.get("host_ms_per_step"):
        gcs = ", ".join(f"{k} {v['count']} ({v['ms']:.1f} ms)" for k, v in r["gc_in_window"].items())
        lines += ["", f"Host time in each step call (no sync inside): {r['host_ms_per_step']} ms; "
                  f"garbage collections in the window: {gcs}."]
    g = r.get("idle_gaps")
    if g:
        lines += ["", f"Device idle inside the window: {g['idle_ms_per_step']:.2f} ms per step, "
                  f"{g['gaps_per_step']} gaps of at least {g['min_gap_us']:.0f} us per step "
                  f"({g['in_small_gaps_ms_per_step']:.2f} ms in shorter ones). Largest:", "",
                  "| kernel before | kernel after | gaps | ms per step | largest us |",
                  "|---|---|---:|---:|---:|"]
        for t in g["top"][:12]:
            lines.append(f"| `{t['before']}` | `{t['after']}` | {t['count']} | "
                         f"{t['ms_per_step']:.3f} | {t['largest_us']:.0f} |")
        lines += ["", "The largest gaps and what the host was doing (innermost host event "
                  "covering 80% of the gap):", "", "| gap us | after kernel | host event | "
                  "its us | host events starting inside |", "|---:|---|---|---:|---|"]
        for h in g.get("largest_with_host", []):
            lines.append(f"| {h['gap_us']:.0f} | `{_short(h['after'])[:50]}` | "
                         f"`{h['host_innermost']}` | {h['host_innermost_us'] or 0:.0f} | "
                         f"{', '.join(h['host_started_inside'])[:120]} |")
    lines += ["", "Command: `python bench/profile_step.py " + " ".join(sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/sftctl_profile"))
    p.add_argument("--workload", choices=("a", "b", "c"), default="a")
    p.add_argument("--skip", type=int, default=4, help="steps before the profiled ones")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--full-examples", type=int, default=64)
    p.add_argument("--skewed-examples", type=int, default=1600)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--sync-each-step", action="store_true",
                   help="sync after every profiled step (the old way; inflates the idle share)")
    p.add_argument("--gap-us", type=float, default=20.0,
                   help="device gaps at least this long are listed by where they fall")
    p.add_argument("extra", nargs="*", help="more sftctl train flags (after --)")
    args = p.parse_args()
    if args.smoke:
        args.seq_len, args.full_examples, args.skewed_examples = 128, 16, 200
        args.skip, args.steps = 1, 2
        args.work = args.work.with_name(args.work.name + "_smoke")
    r = profile(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{r['workload']}_{r['card'].replace(' ', '_')}_{r['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n")
    md = markdown(r)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
