"""An 8B full fine-tune with FSDP2 on one host (issue 17), as far as the 2-GPU machine allows:
``sftctl train`` on a Llama-3.1-8B shape, 2 GPUs (and 1 if it fits), sharded checkpoint save and
resume, and a projection to 8 GPUs from measured NCCL collective times.

Run on the 2-GPU machine through bench/run_8b_device.sh (not a test):

    python bench/bench_8b_fsdp.py --out OUT --budget-s 420 --build-done FILE
    python bench/bench_8b_fsdp.py --out /tmp/x --smoke     # tiny model, CPU, gloo: seconds

Writes OUT/fsdp8b_<card>_<date>.json and .md and prints the table.

What runs, in order (each step is skipped, and recorded as skipped, when the budget left is
too small for it; the device call has a hard limit)
1. NCCL timing (needs no sftctl build, so it runs while the extension builds): all-gather of one
   transformer block's parameters in bf16 and reduce-scatter of its gradients in fp32, and the
   same for the root unit (embeddings + final norm + head): the collectives FSDP2 issues with
   sftctl's policy (fp32 parameters, bf16 compute gathers, fp32 gradient reduction).
2. 2 GPUs, ``torchrun --nproc_per_node 2 -m sftctl train --strategy fsdp --packing
   --max-seq-len 4096 --gradient-checkpointing --precision bf16``: per-GPU tokens/s, MFU, peak
   memory per GPU (rank 0's ``torch.cuda.max_memory_allocated``), time to the first step (launch
   to the first metrics line, so process start, model init and sharding included), and a
   periodic sharded checkpoint (``--save-every``: model + AdamW state, fp32, 12 B/parameter =
   96 GB written with torch.distributed.checkpoint) whose save time sftctl logs.
3. Resume: the final model and summary of run 2 are removed (as if it had stopped after the
   checkpoint) and the same command with ``--resume latest`` continues from the checkpoint: the
   load time (from the log line before sftctl's "resumed from" line, FSDP's "... sharded over
   N ranks", to that line) and
   whether the resumed steps' losses equal the uninterrupted run's.
4. 1 GPU (plain process): fp32 weights + gradients + AdamW state are 16 B/parameter = 128 GB of
   the card's 140 GiB before activations, so this is expected to run out of memory; the result
   (OOM or figures) is recorded.
5. Projection to 8 GPUs (clearly marked): weak scaling (per-GPU batch fixed), compute per GPU
   unchanged; per-step communication = 2 all-gathers of every unit in bf16 (forward, and again
   in backward since FSDP2 reshards after forward) + 1 reduce-scatter in fp32; ring time grows
   with (G-1)/G at the bus bandwidth measured on 2 GPUs (an assumption: an 8-GPU NVSwitch host
   has at least that per-GPU bandwidth). Two bounds: communication fully hidden behind compute
   (step = max(T2, C8)) and not hidden at all beyond what it is on 2 GPUs (step = T2 + C8 - C2).

Design choices
- The model directory holds config.json, the word-level tokenizer of bench_e2e.py and an empty
  weights file; ``--allow-missing-weights`` makes transformers initialise every weight from the
  config (sftctl logs them as missing): no 16-32 GB file is written or read.
- Data: bench_e2e's skewed lengths (lognormal, median 250, clipped to [16, 4096], ~30% prompt),
  packed by sftctl into rows of 4096; 2 rows per GPU micro-batch.
- Disk (128 GiB on the machine): the checkpoint (96 GB) goes where there is room for it plus the
  final model (32 GB); with no such place the save and resume are skipped and the reason is
  recorded.
- MFU uses bench_e2e's formula (6 N_matmul tokens + attention, over 989.5 TFLOP/s per GPU;
  checkpointing recompute not counted), the attention term from the token-weighted mean
  document length of the data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_e2e as e2e  # noqa: E402  (same folder: tokenizer, data, FLOPs)

CKPT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


# ------------------------------------------------------------------------------- NCCL timing

def nccl_worker(out_file: str, sizes_json: str, iters: int) -> None:
    """Under torchrun: time all_gather_into_tensor (bf16) and reduce_scatter_tensor (fp32) for
    each named parameter count; rank 0 writes the medians (ms) and bus bandwidths."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    G, rank = dist.get_world_size(), dist.get_rank()
    res = {}
    for name, numel in json.loads(sizes_json).items():
        n = -(-numel // G) * G
        for op, dtype in (("all_gather", torch.bfloat16), ("reduce_scatter", torch.float32)):
            full = torch.randn(n, device=dev).to(dtype)  # [n]
            shard = torch.randn(n // G, device=dev).to(dtype)  # [n / G]

            def run():
                if op == "all_gather":
                    dist.all_gather_into_tensor(full, shard)
                else:
                    dist.reduce_scatter_tensor(shard, full)

            for _ in range(3):
                run()
            times = []
            for _ in range(iters):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    a.record()
                    run()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                else:
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            nbytes = n * full.element_size()
            res[f"{op}_{name}"] = {"params": numel, "dtype": str(dtype), "bytes": nbytes,
                                   "ms": round(t * 1e3, 3), "gpus": G,
                                   "bus_gb_s": round(nbytes * (G - 1) / G / t / 1e9, 1)}
    if rank == 0:
        Path(out_file).write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def unit_sizes(cfg) -> dict:
    """Parameters of one FSDP unit: a decoder block, and the root (embeddings, norm, head)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    block = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    root = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    return {"block": block, "root": root}


# --------------------------------------------------------------------------------- sftctl runs

def launch(cmd: list[str], env: dict, log_path: Path, metrics: Path, timeout: float,
           after_step: int = 0) -> dict:
    """Run ``cmd``; timestamp every stderr/stdout line (seconds from launch) and note when the
    metrics line of the first step after ``after_step`` appears."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def reader():
        for line in p.stdout:
            for part in line.replace("\r", "\n").splitlines():
                if part.strip() and "it/s]" not in part and "s/it]" not in part:
                    lines.append((round(time.perf_counter() - t0, 2), part))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    first, top, top_at = None, after_step, None
    rc: int | str | None = None
    while rc is None:
        try:
            rc = p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t0 > timeout:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                rc = "timeout"
        seen = [m["step"] for m in read_metrics(metrics.parent) if m["step"] > after_step]
        if seen and first is None:
            first = round(time.perf_counter() - t0, 1)
        if seen and max(seen) > top:
            top, top_at = max(seen), round(time.perf_counter() - t0, 1)
    th.join(timeout=5)
    log_path.write_text(" ".join(cmd) + "\n" + "\n".join(f"[{t:7.2f}] {x}" for t, x in lines))
    done = next((t for t, x in lines if x.startswith("sftctl: done:")), None)
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "time_to_first_step_s": first,
            "last_step_seen_s": top_at, "done_line_s": done, "lines": lines}


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for x in f.read_text().splitlines():
        try:
            m = json.loads(x)
        except ValueError:  # a line being written
            continue
        if m.get("kind") == "train":
            out.append(m)
    return out


def figures(steps: list[dict], warmup: int, gpus: int, cfg, len2_per_token: float) -> dict:
    timed = steps[warmup:] or steps
    if not timed:
        return {}
    tps = statistics.median(m["tokens_per_s"] for m in timed)  # all ranks' tokens / step time
    step_t = statistics.median(m["tokens"] / m["tokens_per_s"] for m in timed)
    tok = statistics.median(m["tokens"] for m in timed)
    flops = 6.0 * e2e.flops_per_token_params(cfg) * tok + 6 * cfg.num_hidden_layers * \
        cfg.num_attention_heads * cfg.head_dim * len2_per_token * tok
    return {"timed_steps": len(timed), "tokens_per_s": round(tps),
            "tokens_per_s_per_gpu": round(tps / gpus),
            "trainable_tokens_per_s_per_gpu": round(statistics.median(
                m["trainable_tokens"] / (m["tokens"] / m["tokens_per_s"]) for m in timed) / gpus),
            "step_time_s": round(step_t, 3), "tokens_per_step": tok,
            "mfu": round(flops / step_t / gpus / e2e.PEAK_BF16, 3),
            "losses": {m["step"]: m["loss"] for m in steps}}


def error_tail(lines: list[tuple[float, str]]) -> str:
    text = [x for _, x in lines]
    oom = [x for x in text if "OutOfMemoryError" in x or "out of memory" in x]
    errs = [x for x in text if re.match(r"^\s*(\[\w+\]:?\s*)?[\w.]*(Error|Exception)\b", x)]
    last = [x for x in text if not x.startswith((" ", "\t", "Traceback"))][-3:]
    return (("OOM: " + oom[-1][:300] + " | ") if oom else "") + \
        (("first error: " + errs[0].strip()[:300] + " | ") if errs else "") + \
        " / ".join(last)[-900:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/sftctl_8b"))
    p.add_argument("--ckpt-root", type=Path, default=None,
                   help="where the run (and its checkpoint) goes; default: the first of --work, "
                        "/dev/shm with room for the checkpoint and the final model")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--save-at", type=int, default=6, help="--save-every of the 2-GPU run")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per GPU micro-batch")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--build-done", type=Path, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["nccl", "fsdp", "resume", "one_gpu"],
                   help="steps to leave out (e.g. a second, warm call: --skip nccl fsdp resume)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (gloo)")
    p.add_argument("--nccl-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nccl_worker:
        nccl_worker(args.nccl_worker[0], args.nccl_worker[1], int(args.nccl_worker[2]))
        return 0
    if args.out is None:
        p.error("--out is required")
    t_begin = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_begin)

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    on_gpu = not args.smoke
    if args.smoke:
        args.seq_len, args.examples, args.steps, args.warmup, args.save_at = 128, 300, 4, 1, 2
        args.batch_size = 2
        args.work = args.work.with_name(args.work.name + "_smoke")
    if on_gpu and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"{args.gpus} GPUs asked for, {torch.cuda.device_count()} visible")
    card = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = e2e.TINY if args.smoke else e2e.LLAMA_8B
    cfg = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    mdir = args.work / "model_8b"
    if not (mdir / "config.json").is_file():
        mdir.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(mdir)
        save_file({}, str(mdir / "model.safetensors"), metadata={"format": "pt"})
        e2e.build_tokenizer(shape["vocab_size"]).save_pretrained(mdir)
    ex = e2e.make_examples("skewed", args.examples, args.seq_len, shape["vocab_size"], seed=11)
    data = args.work / "data.jsonl"
    data.write_text("".join(json.dumps(e["record"]) + "\n" for e in ex))
    lens = [len(e["ids"]) for e in ex]
    len2 = sum(x * x for x in lens) / sum(lens)
    n_params = sum(unit_sizes(cfg)["block"] for _ in range(cfg.num_hidden_layers)) + \
        unit_sizes(cfg)["root"]
    result = {"date": datetime.date.today().isoformat(), "card": card, "smoke": args.smoke,
              "gpus_visible": torch.cuda.device_count() if on_gpu else 0,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
              "model": {k: shape[k] for k in ("hidden_size", "num_hidden_layers",
                                              "intermediate_size", "vocab_size")},
              "params": n_params, "n_matmul_params": e2e.flops_per_token_params(cfg),
              "seq_len": args.seq_len, "per_gpu_batch_rows": args.batch_size,
              "steps": args.steps, "warmup_steps_excluded": args.warmup,
              "data": {"examples": len(ex), "tokens": sum(lens),
                       "length_median": statistics.median(lens), "length_max": max(lens),
                       "len2_per_token": round(len2, 1)},
              "mfu_formula": "(6 * N_matmul * tokens + 6 * layers * hidden * sum(doc_len^2)) / "
                             "step_time / GPUs / 989.5e12; checkpointing recompute not counted"}
    env = dict(os.environ, **NCCL_ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", SFTCTL_DISABLE_PLUGIN_AUTOLOAD="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                               "4"),
               HF_DATASETS_CACHE=str(args.work / "hf_cache"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(args.gpus)]

    # 1. NCCL timing -----------------------------------------------------------------------
    if "nccl" not in args.skip:
        f = args.work / "nccl.json"
        sizes = unit_sizes(cfg)
        r = subprocess.run(torchrun + [str(Path(__file__).resolve()), "--nccl-worker", str(f),
                                       json.dumps(sizes), "10"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=max(30, min(180, left())))
        result["collectives"] = json.loads(f.read_text()) if r.returncode == 0 else {
            "error": (r.stdout + r.stderr)[-1500:]}
        print("collectives:", json.dumps(result["collectives"])[:1500], flush=True)

    # wait for the build
    while args.build_done is not None and not args.build_done.exists():
        time.sleep(2)
    print(f"build done; {left():.0f} s of the budget left", flush=True)

    # where the run goes: room for the checkpoint and the final model (fp32)
    # (the disk first; then tmpfs, which is RAM: a save there is not a disk write; then the
    # disk with room for the checkpoint only: the final model's save may then fail, recorded)
    need = n_params * (CKPT_BYTES_PER_PARAM + 4) * 1.05
    need_ckpt = n_params * CKPT_BYTES_PER_PARAM * 1.05
    cands = [args.ckpt_root] if args.ckpt_root else [args.work, Path("/dev/shm")]
    free = {c: shutil.disk_usage(c).free for c in cands if c.exists()}
    root = next((c for c in free if free[c] > need), None) or \
        next((c for c in free if c != Path("/dev/shm") and free[c] > need_ckpt), None)
    result["disk_free_bytes"] = {str(c): f for c, f in free.items()}
    result["checkpoint_bytes_expected"] = n_params * CKPT_BYTES_PER_PARAM
    save = root is not None
    root = root or args.work
    result["run_root"] = str(root) + (" (tmpfs: RAM, not a disk)" if str(root).startswith(
        "/dev/shm") else "")

    def sftctl_args(run_dir: Path, extra: list[str]) -> list[str]:
        return ["-m", "sftctl", "train", "--model", str(mdir), "--data", str(data),
                "--output-dir", str(run_dir), "--no-eval", "--no-initial-eval",
                "--allow-missing-weights", "--packing", "--max-seq-len", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--grad-accum", "1",
                "--max-steps", str(args.steps), "--lr", "1e-5", "--seed", "1",
                "--gradient-checkpointing", "--heldout-size", "0",
                "--precision", "fp32" if args.smoke else "bf16",
                "--device", "cpu" if args.smoke else "cuda"] + extra

    runs = result["runs"] = {}

    def dump(final: bool = False) -> None:
        """Write the JSON and .md (after every step too: an outer timeout keeps what ran)."""
        result["projection_8gpu"] = project(result, cfg, args.gpus)
        stem = f"fsdp8b_{card.replace(' ', '_').replace('/', '_')}_{result['date']}" + \
            ("_smoke" if args.smoke else "") + ("_skip-" + "-".join(args.skip) if args.skip
                                                else "")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        md = markdown(result)
        (args.out / f"{stem}.md").write_text(md)
        if final:
            print(md)

    # 2. N GPUs, FSDP2 ------------------------------------------------------------------------
    run_dir = root / "fsdp_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    if "fsdp" in args.skip:
        runs["fsdp"] = {"rc": "skipped", "error": "--skip fsdp"}
    elif left() < 120 and not args.smoke:
        runs["fsdp"] = {"rc": "skipped", "error": f"{left():.0f} s of the budget left"}
    else:
        extra = ["--strategy", "fsdp", "--overwrite"] + (
            ["--save-every", str(args.save_at), "--keep-last", "1"] if save else [])
        cmd = torchrun + sftctl_args(run_dir, extra)
        print("[fsdp]", " ".join(cmd), flush=True)
        r = launch(cmd, env, args.work / "fsdp.log", run_dir / "metrics.jsonl",
                   timeout=left() - 10)
        steps = read_metrics(run_dir)
        rec = {"command": " ".join(cmd[1:]), "rc": r["rc"], "wall_s": r["wall_s"],
               "gpus": args.gpus, "strategy": "fsdp",
               "time_to_first_step_s": r["time_to_first_step_s"],
               **figures(steps, args.warmup, args.gpus, cfg, len2)}
        saves = [(t, x) for t, x in r["lines"] if re.search(r"checkpoint \S+ saved", x)]
        if saves:
            m = re.search(r"saved \((\w+), ([\d.]+) s\)", saves[0][1])
            rec["checkpoint_save_s"] = float(m.group(2)) if m else None
            ck = next((run_dir / "checkpoints").glob("step-*"), None)
            rec["checkpoint_bytes"] = sum(f.stat().st_size for f in ck.rglob("*") if f.is_file()) \
                if ck else None
        elif not save:
            rec["checkpoint"] = f"not saved: no place with {need / 1e9:.0f} GB free " \
                                f"({result['disk_free_bytes']})"
        summ = run_dir / "summary.json"
        if summ.is_file():
            s = json.loads(summ.read_text())
            rec["peak_memory_gib_rank0"] = round(s["peak_memory_bytes"] / 2**30, 2)
            rec.update({k: s.get(k) for k in ("loss_kernel", "loss_impl", "fallbacks", "compiled",
                                              "wall_time_s", "train_time_s", "parameters")})
            rec["attention"] = e2e.attention_label(s)
            rec["attention_summary"] = next((v for k, v in s.items()
                                             if "attn" in k or "attention" in k), None)
        # the final consolidated save (gather to rank 0 + write): from the last step's metrics
        # line (polled every 0.5 s) to sftctl's "done:" line
        if r["done_line_s"] and r["last_step_seen_s"]:
            rec["final_model_save_s_approx"] = round(r["done_line_s"] - r["last_step_seen_s"], 1)
        if r["rc"] != 0:
            rec["error"] = error_tail(r["lines"])
        runs["fsdp"] = rec
        print("[fsdp]", {k: v for k, v in rec.items() if k != "losses"}, flush=True)
        dump()

    # 3. resume --------------------------------------------------------------------------------
    ck_ok = save and (run_dir / "checkpoints").is_dir() and any(
        (run_dir / "checkpoints").glob("step-*"))
    if "resume" in args.skip:
        runs["resume"] = {"rc": "skipped", "error": "--skip resume"}
    elif not ck_ok:
        runs["resume"] = {"rc": "skipped", "error": "no checkpoint from the FSDP run"}
    elif left() < 100 and not args.smoke:
        runs["resume"] = {"rc": "skipped", "error": f"{left():.0f} s of the budget left"}
    else:
        ref = {m["step"]: m["loss"] for m in read_metrics(run_dir)}
        ck_step = max(int(c.name.split("-")[1]) for c in (run_dir / "checkpoints").glob("step-*"))
        mf = run_dir / "metrics.jsonl"
        shutil.copy(mf, args.work / "metrics_uninterrupted.jsonl")
        # as if the run had stopped right after the checkpoint: no final model or summary, no
        # metrics past it (sftctl rewrites the file from the checkpoint's history anyway)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        (run_dir / "summary.json").unlink(missing_ok=True)
        mf.write_text("".join(x + "\n" for x in mf.read_text().splitlines()
                              if x.strip() and json.loads(x).get("step", 0) <= ck_step))
        cmd = torchrun + sftctl_args(run_dir, ["--strategy", "fsdp", "--save-every",
                                               str(args.save_at), "--keep-last", "1",
                                               "--resume", "latest"])
        print("[resume]", " ".join(cmd), flush=True)
        r = launch(cmd, env, args.work / "resume.log", run_dir / "metrics.jsonl",
                   timeout=left() - 5, after_step=ck_step)
        after = [m for m in read_metrics(run_dir) if m["step"] > ck_step]
        # load time: from the log line before "resumed from" (FSDP's "... sharded over N
        # ranks") to that line
        i_res = next((i for i, (_, x) in enumerate(r["lines"]) if "resumed from" in x), None)
        t_res = r["lines"][i_res][0] if i_res else None
        t_model = r["lines"][i_res - 1][0] if i_res else None
        before = r["lines"][i_res - 1][1][:160] if i_res else None
        got = {m["step"]: m["loss"] for m in after}
        common = sorted(set(got) & set(ref))
        rec = {"command": " ".join(cmd[1:]), "rc": r["rc"], "wall_s": r["wall_s"],
               "checkpoint_step": ck_step,
               "resume_load_s": round(t_res - t_model, 1) if t_res and t_model else None,
               "resume_load_measured_from": before,
               "time_to_first_step_s": r["time_to_first_step_s"],
               "resumed_line": next((x for _, x in r["lines"] if "resumed from" in x), None),
               "losses_resumed": got, "steps_compared": common,
               "max_rel_loss_diff": max((abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12)
                                         for s in common), default=None),
               "losses_identical": bool(common) and all(got[s] == ref[s] for s in common)}
        if r["rc"] != 0:
            rec["error"] = error_tail(r["lines"])
        runs["resume"] = rec
        print("[resume]", rec, flush=True)
        dump()
    shutil.rmtree(run_dir, ignore_errors=True)

    # 4. one GPU ------------------------------------------------------------------------------
    one_dir = args.work / "one_gpu"
    shutil.rmtree(one_dir, ignore_errors=True)
    if "one_gpu" in args.skip:
        runs["one_gpu"] = {"rc": "skipped", "error": "--skip one_gpu"}
    elif left() < 90 and not args.smoke:
        runs["one_gpu"] = {"rc": "skipped", "error": f"{left():.0f} s of the budget left"}
    else:
        cmd = [sys.executable] + sftctl_args(one_dir, ["--overwrite"])
        print("[one_gpu]", " ".join(cmd), flush=True)
        r = launch(cmd, env, args.work / "one_gpu.log", one_dir / "metrics.jsonl",
                   timeout=left() - 5)
        steps = read_metrics(one_dir)
        rec = {"command": " ".join(cmd[1:]), "rc": r["rc"], "wall_s": r["wall_s"], "gpus": 1,
               "time_to_first_step_s": r["time_to_first_step_s"],
               **figures(steps, args.warmup, 1, cfg, len2)}
        if (one_dir / "summary.json").is_file():
            s = json.loads((one_dir / "summary.json").read_text())
            rec["peak_memory_gib_rank0"] = round(s["peak_memory_bytes"] / 2**30, 2)
        if r["rc"] != 0:
            rec["error"] = error_tail(r["lines"])
        runs["one_gpu"] = rec
        print("[one_gpu]", {k: v for k, v in rec.items() if k != "losses"}, flush=True)
        dump()
        shutil.rmtree(one_dir, ignore_errors=True)
    # 5. projection (in dump) --------------------------------------------------------------------
    dump(final=True)
    return 0


def project(result: dict, cfg, G: int) -> dict:
    """PROJECTION (not a measurement) of the weak-scaling step time on 8 GPUs of one host."""
    nc, fs = result.get("collectives") or {}, result["runs"].get("fsdp") or {}
    if "error" in nc or not nc or not fs.get("step_time_s"):
        return {"note": "no projection: the NCCL timing or the FSDP run is missing"}
    L = cfg.num_hidden_layers
    ag = L * nc["all_gather_block"]["ms"] + nc["all_gather_root"]["ms"]
    rs = L * nc["reduce_scatter_block"]["ms"] + nc["reduce_scatter_root"]["ms"]
    c2 = (2 * ag + rs) / 1e3  # s per step on G GPUs (one micro-batch per step)
    c8 = c2 * (7 / 8) / ((G - 1) / G)  # same bus bandwidth, ring volume (G-1)/G
    t2 = fs["step_time_s"]
    best, worst = sorted((max(t2, c8), t2 + max(0.0, c8 - c2)))
    tok = fs["tokens_per_step"] / G  # per GPU
    return {"PROJECTION": True,
            "assumptions": "weak scaling (per-GPU batch fixed), compute per GPU as measured on "
                           f"{G} GPUs, per step 2 bf16 all-gathers + 1 fp32 reduce-scatter of "
                           "every FSDP unit, ring volume (G-1)/G at the bus bandwidth measured "
                           f"on {G} GPUs; bounds: fully overlapped max(T{G}, C8), not overlapped "
                           f"T{G} + C8 - C{G}",
            f"comm_s_per_step_{G}gpu": round(c2, 4), "comm_s_per_step_8gpu": round(c8, 4),
            f"step_s_{G}gpu_measured": t2,
            "step_s_8gpu_range": [round(best, 3), round(worst, 3)],
            "tokens_per_s_per_gpu_8gpu_range": [round(tok / worst), round(tok / best)],
            "weak_scaling_efficiency_2_to_8_range": [round(t2 / worst, 3), round(t2 / best, 3)],
            "mfu_8gpu_range": [round(fs["mfu"] * t2 / worst, 3), round(fs["mfu"] * t2 / best, 3)]}


def markdown(r: dict) -> str:
    fs, rs, one = (r["runs"].get(k, {}) for k in ("fsdp", "resume", "one_gpu"))
    L = [f"# sftctl 8B full fine-tune, FSDP2, {r['card']}, {r['date']}", "",
         f"Llama-3.1-8B shape ({r['params'] / 1e9:.2f}B parameters, built from config), packed "
         f"rows of {r['seq_len']} tokens, {r['per_gpu_batch_rows']} rows per GPU micro-batch, "
         f"activation checkpointing, bf16 autocast, fp32 master weights and AdamW state, "
         f"sftctl's default (fused) loss; median of steps {r['warmup_steps_excluded'] + 1}.."
         f"{r['steps']}. torch {r['torch']}, CUDA {r['cuda']}, NCCL {r['nccl']}. MFU = "
         f"{r['mfu_formula']}.", "",
         "| run | GPUs | tokens/s per GPU | trainable tok/s per GPU | MFU | step s | "
         "peak GiB (rank 0) | first step s | rc |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, x in (("FSDP2", fs), ("1 GPU", one)):
        if x.get("tokens_per_s_per_gpu"):
            L.append(f"| {name} | {x.get('gpus')} | {x['tokens_per_s_per_gpu']:,} | "
                     f"{x['trainable_tokens_per_s_per_gpu']:,} | {x['mfu']:.3f} | "
                     f"{x['step_time_s']} | {x.get('peak_memory_gib_rank0', '-')} | "
                     f"{x.get('time_to_first_step_s')} | {x['rc']} |")
        else:
            L.append(f"| {name} | {x.get('gpus', '-')} | – | – | – | – | – | – | {x.get('rc')}: "
                     f"{str(x.get('error', ''))[:200].replace('|', '/')} |")
    L += ["", f"Loss path: {fs.get('loss_impl')} ({fs.get('loss_kernel')}); attention: "
              f"{fs.get('attention')}; fallbacks: {fs.get('fallbacks')}.", "",
          f"Sharded checkpoint (model + AdamW, torch.distributed.checkpoint, "
          f"{r['checkpoint_bytes_expected'] / 1e9:.0f} GB expected, under {r['run_root']}): "
          + (f"saved in {fs['checkpoint_save_s']} s ({(fs.get('checkpoint_bytes') or 0) / 1e9:.1f}"
             f" GB on disk)" if fs.get("checkpoint_save_s") is not None else
             str(fs.get("checkpoint", "not saved"))) +
          f"; final consolidated model save ~{fs.get('final_model_save_s_approx')} s.",
          f"Resume: {rs.get('rc')}" + (
              f", load {rs.get('resume_load_s')} s (log lines: sharded model -> 'resumed from'), "
              f"first step "
              f"after {rs.get('time_to_first_step_s')} s from launch; steps compared "
              f"{rs.get('steps_compared')}: losses identical {rs.get('losses_identical')} "
              f"(max rel diff {rs.get('max_rel_loss_diff')})" if rs.get("rc") == 0 else
              f" {rs.get('error', '')}") + "."]
    nc = r.get("collectives") or {}
    if nc and "error" not in nc:
        L += ["", "| collective | params | bytes | ms | bus GB/s |", "|---|---:|---:|---:|---:|"]
        for k, v in nc.items():
            L.append(f"| {k} | {v['params'] / 1e6:.0f}M | {v['bytes'] / 1e6:.0f} MB | "
                     f"{v['ms']} | {v['bus_gb_s']} |")
    pj = r.get("projection_8gpu") or {}
    if pj.get("PROJECTION"):
        L += ["", "**PROJECTION for 8 GPUs (not measured):** " + pj["assumptions"] + ". "
              f"Step {pj['step_s_8gpu_range'][0]}-{pj['step_s_8gpu_range'][1]} s, "
              f"{pj['tokens_per_s_per_gpu_8gpu_range'][0]:,}-"
              f"{pj['tokens_per_s_per_gpu_8gpu_range'][1]:,} tokens/s per GPU, weak-scaling "
              f"efficiency 2->8 {pj['weak_scaling_efficiency_2_to_8_range'][0]}-"
              f"{pj['weak_scaling_efficiency_2_to_8_range'][1]}, MFU "
              f"{pj['mfu_8gpu_range'][0]}-{pj['mfu_8gpu_range'][1]}."]
    else:
        L += ["", f"Projection: {pj.get('note')}"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
