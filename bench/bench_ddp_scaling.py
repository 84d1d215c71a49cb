"""Data-parallel scaling of ``sftctl train`` on torchrun: tokens/s on 1 GPU vs N GPUs (DDP, FSDP2).

Run on a machine with 2 (or more) GPUs (not a test):

    python bench/bench_ddp_scaling.py --out bench/results            # 1 vs 2 GPUs, ddp + fsdp
    python bench/bench_ddp_scaling.py --out bench/results --size large   # ~0.8B parameters
    python bench/bench_ddp_scaling.py --out /tmp/x --device cpu --size small   # smoke run (gloo)

Writes OUT/ddp_scaling_<card>_<date>.json and .md and prints the table. With ``--check`` (default
on when CUDA has 2 GPUs) it first runs the NCCL equality test of tests/test_distributed.py (the
per-step losses and the final weights of 2 GPUs with batch b vs 1 GPU with batch 2b).

Design choices
- Weak scaling, the usual measure for data parallelism: the per-GPU micro-batch and accumulation
  stay fixed, so N GPUs train N times the tokens per optimizer step; scaling = tokens/s on N GPUs
  / tokens/s on 1 GPU (ideal N). The 1-GPU baseline is a plain single process (no wrapper, no
  collectives): that is what a user compares against.
- The model is built from a Llama config (no download) with the project's demo tokenizer:
  ~200M parameters (hidden 1024, 16 layers), large enough that the gradient all-reduce (800 MB of
  fp32 per step) and the compute are both real; packed rows of 1024 tokens, bf16 autocast, 4
  micro-batches per step (the all-reduce runs once per step, overlapped with the last backward).
- Throughput is read from the run's own metrics.jsonl (``tokens_per_s`` of every step: tokens of
  all ranks over rank 0's step time); the median over the steps after the first ``--warmup``
  excludes compilation/allocator warm-up. Peak memory and loss are taken from summary.json.
- Every run is a real ``sftctl train`` launched the way users launch it (``torchrun
  --nproc_per_node N -m sftctl train``), one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
         "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 64,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}
# ~0.8B parameters: compute-bound on one H100/H200 (the 207M model leaves the GPU waiting on
# the Python launch of eager kernels, which two processes on one host share less well)
LARGE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
         "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
         "max_position_embeddings": 256}


def build_inputs(work: Path, size: str, examples: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    from sftctl import demo_data, demo_model

    base = work / f"base_{size}"
    data = work / "train.jsonl"
    if not (base / "config.json").is_file():
        tok = demo_model.build_tokenizer()
        model = demo_model.build_model(tok, seed=0, overrides={"small": SMALL, "base": MODEL,
                                                               "large": LARGE}[size])
        model.save_pretrained(base, safe_serialization=True)
        tok.model_max_length = model.config.max_position_embeddings
        tok.save_pretrained(base)
    if not data.is_file():
        demo_data.write_jsonl(demo_data.generate(examples, seed=1), data)
    return base, data


def train(work: Path, name: str, nproc: int, strategy: str, base: Path, data: Path, args) -> dict:
    out = work / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               SFTCTL_DISABLE_PLUGIN_AUTOLOAD="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
               HF_DATASETS_CACHE=str(work / "hf_cache"))
    train_args = ["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                  "--overwrite", "--no-eval", "--no-initial-eval", "--quiet", "--packing",
                  "--max-seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                  "--grad-accum", str(args.grad_accum), "--max-steps", str(args.steps),
                  "--lr", "1e-4", "--device", args.device, "--precision", args.precision,
                  "--seed", "1"] + (["--compile"] if args.compile else [])
    if nproc == 1 and strategy == "none":
        cmd = [sys.executable, "-m", "sftctl", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "sftctl", *train_args, "--strategy", strategy]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    (work / f"{name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"[{name}] failed (rc {r.returncode}); see {work / f'{name}.log'}:\n"
                         + r.stderr[-3000:])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    steps = [m for m in metrics if m["kind"] == "train"]
    timed = steps[args.warmup:] or steps
    summary = json.loads((out / "summary.json").read_text())
    return {"name": name, "gpus": nproc, "strategy": strategy,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "step_time_s": statistics.median(m["tokens"] / m["tokens_per_s"] for m in timed),
            "tokens_per_step": statistics.median(m["tokens"] for m in timed),
            "timed_steps": len(timed), "final_loss": summary["final_loss"],
            "peak_memory_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
            "peak_memory_kind": summary["peak_memory_kind"], "device": summary["device"],
            "losses": [m["loss"] for m in steps]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/sftctl_ddp_scaling"))
    p.add_argument("--gpus", type=int, default=2, help="N of the N-GPU runs (default 2)")
    p.add_argument("--strategies", nargs="*", default=["ddp", "fsdp"],
                   help="N-GPU strategies to time (none given: only the 1-GPU baseline)")
    p.add_argument("--compile", action="store_true",
                   help="train with --compile (torch.compile of each transformer block)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--size", choices=["small", "base", "large"], default="base",
                   help="model: base ~207M (default), large ~0.8B, small = tiny (CPU smoke run)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per GPU micro-batch")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--examples", type=int, default=60000)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="run the 2-GPU NCCL equality test first (default: when 2 GPUs exist)")
    args = p.parse_args()

    import torch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"{args.gpus} GPUs asked for, {torch.cuda.device_count()} visible")
    card = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    check = {"ran": False}
    if args.check or (args.check is None and on_gpu and torch.cuda.device_count() >= 2):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_distributed.py",
                            "-k", "two_gpus"], cwd=REPO, capture_output=True, text=True)
        check = {"ran": True, "passed": r.returncode == 0, "output": r.stdout[-2000:]}
        print(r.stdout[-2000:], flush=True)

    base, data = build_inputs(work, args.size, args.examples)
    runs = [train(work, "1gpu_single", 1, "none", base, data, args)]
    for s in args.strategies:
        runs.append(train(work, f"{args.gpus}gpu_{s}", args.gpus, s, base, data, args))
    ref = runs[0]["tokens_per_s"]
    for r in runs:
        r["scaling"] = round(r["tokens_per_s"] / ref, 3)
        r["efficiency"] = round(r["scaling"] / r["gpus"], 3)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # count parameters without allocating them
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(base)).parameters())
    result = {
        "date": datetime.date.today().isoformat(), "card": card,
        "gpus_visible": torch.cuda.device_count() if on_gpu else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
        "model_params": n_params, "model_size": args.size, "compile": args.compile,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "4"),
        "precision": args.precision, "seq_len": args.seq_len,
        "per_gpu_batch_rows": args.batch_size, "grad_accum": args.grad_accum,
        "steps": args.steps, "warmup_steps_excluded": args.warmup,
        "nccl_equality_check": check, "runs": runs,
    }
    stem = (f"ddp_scaling_{card.replace(' ', '_').replace('/', '_')}_{n_params / 1e6:.0f}M_"
            f"{'compile_' if args.compile else ''}{result['date']}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# sftctl data-parallel scaling, {card}, {result['date']}", "",
             f"Model: Llama, {n_params / 1e6:.1f}M parameters (built from config), "
             f"{args.precision}{', --compile' if args.compile else ''}, packed rows of "
             f"{args.seq_len} tokens, {args.batch_size} rows per "
             f"GPU micro-batch x {args.grad_accum} accumulation; median of steps "
             f"{args.warmup + 1}..{args.steps}. torch {torch.__version__}, "
             f"OMP_NUM_THREADS={result['omp_num_threads']} per process.", "",
             "| run | GPUs | tokens/s | scaling | efficiency | step s | peak mem GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['gpus']} | {r['tokens_per_s']:.0f} | {r['scaling']:.2f}x"
                     f" | {r['efficiency']:.2f} | {r['step_time_s']:.3f} | "
                     f"{r['peak_memory_gib']} |")
    if check["ran"]:
        lines += ["", f"NCCL equality test (2 GPUs batch b vs 1 GPU batch 2b, fp32): "
                      f"{'passed' if check['passed'] else 'FAILED'}"]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
