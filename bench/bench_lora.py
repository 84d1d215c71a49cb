"""LoRA on one GPU: ``sftctl train --plugin lora`` vs a plain PEFT + Hugging Face loop vs PEFT +
HF + Liger kernels, on the same packed token rows (issue 13's goal: sftctl >= 1.3x the tokens/s
of PEFT + HF at no more memory).

Run on the GPU machine through bench/run_lora_device.sh (not a test):

    python bench/bench_lora.py --out OUT                         # 8B shape, every runner
    python bench/bench_lora.py --out OUT --runners sftctl hf_peft
    python bench/bench_lora.py --out /tmp/x --smoke              # tiny shapes on the CPU, seconds

Writes OUT/lora_<card>_<date>.json and .md and prints the table.

Workload: the Llama-3.1-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256, untied head, rope theta 500000 with its llama3 rope scaling), random init,
bf16 base weights, LoRA r=16 alpha=32 (no dropout) on every linear layer of the blocks (q, k, v,
o, gate, up, down), packed rows of 2048 tokens, ``--batch-size`` rows per optimizer step, AdamW
lr 1e-4.

Design choices
- One subprocess per runner, each with its own timeout; a failure (OOM, timeout, missing
  package) is recorded with the end of its log and the next runner starts. A global budget
  (``--budget-s``) skips a runner that cannot start in the time left (recorded as skipped).
- Identical tokens for every runner: the parent draws the examples once (seeded lengths,
  token ids ``w<id>`` words, ~30 % of each example prompt), writes them as Alpaca JSONL for
  ``sftctl train`` with a word-level tokenizer of exactly 128256 entries (one id per
  whitespace-separated word) saved in the model directory, and computes the ids sftctl gives
  them (the alpaca format's own segments + EOS) and the packed rows with sftctl's own
  ``BatchPlan`` (same seed, same first-fit packing); the HF runners read those rows
  (``rows.json``). sftctl's tokens per step are checked against the file.
- The HF runners pass ``position_ids`` that restart per document and no attention mask:
  transformers keeps attention inside documents (its packed-sequence path). Labels are the ids
  where the example's response is, else -100 (HF shifts them inside the model); every document
  starts with a prompt token, so no target crosses a document.
- Model init: the HF runners build the model from its config directly on the GPU in bf16
  (``torch.device('cuda')`` context, seeded); peft keeps the adapters fp32 and the loop runs
  under bf16 autocast (what ``TrainingArguments(bf16=True)`` does), AdamW ``fused=True``.
  ``sftctl train`` needs a model directory: it gets config.json, the tokenizer and an empty
  model.safetensors, and ``--allow-missing-weights`` has transformers initialise every weight
  from the config (no 16 GB file written or read). sftctl runs with its defaults plus
  ``--packing`` and ``--precision bf16``; its lora plugin holds the frozen base in bf16
  (``--lora-base-dtype auto``). sftctl loads the base in fp32 before the plugin casts it, so
  its peak memory includes that transient 32 GB unless training needs more.
- Throughput: median over the steps after ``--warmup`` of tokens/s, tokens = the document
  tokens of the step's rows (no padding). sftctl's figures come from its metrics.jsonl; the HF
  runners synchronise the GPU at the end of each step and time it with the host clock. Peak
  memory is ``torch.cuda.max_memory_allocated`` over the whole process (sftctl's summary.json
  reports the same counter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02}
TINY = dict(LLAMA_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=2048)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNNERS = ("hf_peft", "hf_liger_peft", "sftctl", "sftctl_compile", "sftctl_eager")
# sftctl with its defaults, and with --compile on / off named (what --compile auto picks for a
# LoRA model is stated in summary.json's "compiled")
SFTCTL_FLAGS = {"sftctl": [], "sftctl_compile": ["--compile"], "sftctl_eager": ["--no-compile"]}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
LR = 1e-4


def import_sftctl() -> None:
    """``import sftctl`` from this checkout even while its editable install is still being
    built (run_lora_device.sh builds it in the background): the package maps ``sftctl`` to
    core/ and ``sftctl.plugins``/``sftctl.evals`` to plugins/ and evals/ (setup.py)."""
    try:
        import sftctl  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sftctl", REPO / "core" / "__init__.py",
        submodule_search_locations=[str(REPO / "core"), str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sftctl"] = mod
    spec.loader.exec_module(mod)


# ------------------------------------------------------------------------------------- inputs


def template_words() -> list[str]:
    from sftctl.plugins.alpaca.demo_data import format_prompt

    return sorted(set(format_prompt({"instruction": "", "input": ""}).split()))


def save_tokenizer(path: Path, vocab_size: int, max_len: int) -> None:
    """A word-level tokenizer: specials, the Alpaca template's words, then ``w0``, ``w1``, ...
    up to exactly ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + template_words()
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(vocab_size - len(words)):
        vocab[f"w{i}"] = len(words) + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=max_len)
    fast.save_pretrained(path)


def make_records(n: int, seq_len: int, n_words: int, seed: int) -> list[dict]:
    """Alpaca records of seeded lengths (lognormal, median ~300 tokens, clipped so that an
    example with the template and EOS fits a row); ~30 % of each example is the prompt."""
    import numpy as np

    from sftctl.plugins.alpaca.demo_data import format_prompt

    rng = np.random.default_rng(seed)
    overhead = len(format_prompt({"instruction": "", "input": ""}).split()) + 1  # + EOS
    out = []
    for _ in range(n):
        total = int(np.clip(rng.lognormal(np.log(300), 0.8), 32, seq_len - overhead - 1))
        n_prompt = max(1, int(0.3 * total))
        ids = rng.integers(0, n_words, size=total)
        words = [f"w{i}" for i in ids]
        out.append({"instruction": " ".join(words[:n_prompt]),
                    "output": " ".join(words[n_prompt:])})
    return out


def encode(records, tok) -> list[tuple[list[int], list[int]]]:
    """(ids, trained mask) per record as sftctl's data pipeline builds them: the alpaca
    format's segments (prompt untrained, response trained), then EOS (trained)."""
    from sftctl.plugins.alpaca import to_segments

    out = []
    for r in records:
        ids, mask = [], []
        for seg in to_segments(r):
            piece = tok(seg.text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(seg.trainable)] * len(piece)
        ids.append(tok.eos_token_id)
        mask.append(1)
        out.append((ids, mask))
    return out


def prepare(work: Path, args) -> dict:
    """Model directory (config, tokenizer, empty weights), Alpaca JSONL and the packed rows."""
    import numpy as np
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sftctl.data.batching import BatchPlan

    cfg = dict(TINY if args.smoke else LLAMA_8B)
    model_dir = work / ("model_tiny" if args.smoke else "model_8b")
    model_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(model_dir, cfg["vocab_size"], args.seq_len)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == cfg["vocab_size"], (len(tok), cfg["vocab_size"])
    cfg.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    save_file({}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    n_words = cfg["vocab_size"] - len(SPECIALS) - len(template_words())
    need = args.batch_size * (args.steps + 2) * args.seq_len
    records = make_records(max(64, int(need / 300 * 1.5)), args.seq_len, n_words, args.seed)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    enc = encode(records, tok)
    lengths = np.array([len(i) for i, _ in enc])
    plan = BatchPlan(lengths, args.batch_size, args.seq_len, True, args.seed, shuffle=True)
    batches = plan.batches(0)[: args.steps]
    if len(batches) < args.steps:
        raise SystemExit(f"only {len(batches)} packed batches for {args.steps} steps")
    rows = [[[enc[i][0] for i in row] for row in b] for b in batches]
    masks = [[[enc[i][1] for i in row] for row in b] for b in batches]
    (work / "rows.json").write_text(json.dumps({"rows": rows, "masks": masks}))
    step_tokens = [sum(len(d) for row in b for d in row) for b in rows]
    return {"model_dir": str(model_dir), "data": str(data), "config": cfg,
            "rows": str(work / "rows.json"), "step_tokens": step_tokens,
            "records": len(records)}


# ---------------------------------------------------------------------------- the HF runners


def hf_worker(spec: dict) -> dict:
    """PEFT + HF (optionally Liger) on the rows of ``spec['rows']``; runs in its own process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run; OpenMP spinning on a shared CPU
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # class-level patches (RMSNorm, SwiGLU MLP, RoPE, fused linear + cross-entropy when
        # labels are given), applied before the model is built
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    from peft import LoraConfig, get_peft_model

    cfg = AutoConfig.for_model(**{k: v for k, v in spec["config"].items()
                                  if k not in ("architectures",)})
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none",
                                             task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0,
                            fused=device.type == "cuda")
    data = json.loads(Path(spec["rows"]).read_text())
    steps = []
    model.train()
    for rows, masks in zip(data["rows"], data["masks"]):
        T = max(sum(len(d) for d in row) for row in rows)
        ids = torch.full((len(rows), T), spec["config"]["pad_token_id"], dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        tokens = 0
        for r, (row, mrow) in enumerate(zip(rows, masks)):
            t = 0
            for doc, m in zip(row, mrow):
                n = len(doc)
                ids[r, t:t + n] = torch.tensor(doc)
                pos[r, t:t + n] = torch.arange(n)
                labels[r, t:t + n] = torch.where(torch.tensor(m) == 1, torch.tensor(doc), -100)
                t += n
            tokens += t
            # the padding tail continues the positions (its own "document"), never trained
            pos[r, t:] = torch.arange(T - t)
        ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss)  # host sync
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        steps.append({"loss": lv, "tokens": tokens, "time": dt, "tokens_per_s": tokens / dt})
    total = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "trainable": sum(p.numel() for p in trainable), "total": total,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device))
            if device.type == "cuda" else None}


# ------------------------------------------------------------------------------ sftctl runner


def sftctl_cmd(spec: dict, out: Path, name: str = "sftctl") -> list[str]:
    return [sys.executable, "-m", "sftctl", "train", "--plugin", "lora",
            "--model", spec["model_dir"], "--allow-missing-weights", "--data", spec["data"],
            "--output-dir", str(out), "--overwrite", "--no-eval", "--no-initial-eval", "--quiet",
            "--packing", "--max-seq-len", str(spec["seq_len"]), "--batch-size",
            str(spec["batch_size"]), "--max-steps", str(spec["steps"]), "--lr", str(LR),
            "--seed", str(spec["seed"]), "--precision", "bf16", "--device", spec["device"],
            "--lora-r", "16", "--lora-alpha", "32",  # default targets: the blocks' linears
            *SFTCTL_FLAGS[name]]


def read_sftctl(out: Path) -> dict:
    """Steps from metrics.jsonl (written as it trains), the rest from summary.json if the run
    got that far (the merged 8B checkpoint is written after the last step)."""
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    steps = [{"loss": m["loss"], "tokens": m["tokens"], "time": m["tokens"] / m["tokens_per_s"],
              "tokens_per_s": m["tokens_per_s"]} for m in metrics if m["kind"] == "train"]
    res = {"steps": steps}
    if (out / "summary.json").is_file():
        s = json.loads((out / "summary.json").read_text())
        res.update(trainable=s["parameters"]["trainable"], total=s["parameters"]["total"],
                   peak_memory_bytes=s.get("peak_memory_bytes"),
                   sftctl={k: s.get(k) for k in ("loss_kernel", "attention", "fallbacks",
                                                 "compiled", "precision", "versions")
                           if k in s})
    return res


# ------------------------------------------------------------------------------------ driver


def _tail(text, n=3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run_one(name: str, spec: dict, work: Path, timeout: float, marker: str | None = None
            ) -> dict:
    log = work / f"{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               SFTCTL_DISABLE_PLUGIN_AUTOLOAD="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf_cache"))
    t0 = time.monotonic()
    out = work / f"run_{name}"
    building = bool(marker and Path(marker).exists())
    if name.startswith("sftctl"):
        while marker and Path(marker).exists() and time.monotonic() - t0 < timeout:
            time.sleep(1)  # the extension is still being built (run_lora_device.sh)
        waited = time.monotonic() - t0
        building = False
        cmd = sftctl_cmd(spec, out, name)
    else:
        (work / f"{name}.spec.json").write_text(json.dumps(dict(spec, liger=name ==
                                                                "hf_liger_peft")))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
               str(work / f"{name}.spec.json"), "--result", str(work / f"{name}.result.json")]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    status, rc, text = "ok", None, ""
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=max(30.0, timeout - (time.monotonic() - t0)), cwd=REPO)
        rc, text = r.returncode, r.stdout + r.stderr
        if rc != 0:
            status = "failed"
    except subprocess.TimeoutExpired as e:
        status, text = "timeout", _tail(e.stdout) + _tail(e.stderr)
    log.write_text(text)
    res = {"name": name, "status": status, "rc": rc, "wall_s": round(time.monotonic() - t0, 1),
           # the HF runners may run while the extension builds on the CPU (recorded)
           "extension_build_running_at_start": building}
    if name.startswith("sftctl"):
        res["waited_for_build_s"] = round(waited, 1)
    try:
        if name.startswith("sftctl"):
            res.update(read_sftctl(out))
        elif status == "ok":
            res.update(json.loads((work / f"{name}.result.json").read_text()))
    except (OSError, ValueError, KeyError) as e:
        res["read_error"] = f"{type(e).__name__}: {e}"
    if status != "ok" or "read_error" in res:
        res["log_tail"] = _tail(text)
    return res


def summarize(res: dict, warmup: int, want_tokens: list[int]) -> dict:
    steps = res.pop("steps", None) or []
    if not steps:
        return res
    timed = steps[warmup:] or steps
    res["steps_done"] = len(steps)
    res["timed_steps"] = len(timed)
    res["tokens_per_s"] = statistics.median(s["tokens_per_s"] for s in timed)
    res["step_time_s"] = statistics.median(s["time"] for s in timed)
    res["losses"] = [round(s["loss"], 4) for s in steps]
    got = [s["tokens"] for s in steps]
    res["same_tokens_as_rows"] = got == want_tokens[:len(got)]
    if res.get("peak_memory_bytes"):
        res["peak_memory_gib"] = round(res["peak_memory_bytes"] / 2**30, 2)
    return res


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"# LoRA on one GPU: sftctl vs PEFT + HF, {r['card']}, {r['date']}", "",
             f"Llama shape hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
             f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV, intermediate "
             f"{c['intermediate_size']}, vocab {c['vocab_size']} ({r['model_params'] / 1e9:.2f}B "
             "parameters, random init, bf16 base weights); LoRA r=16 alpha=32 on "
             f"{', '.join(TARGETS)}; packed rows of {r['seq_len']} tokens, {r['batch_size']} "
             f"rows per step, {r['steps']} steps, median of steps {r['warmup'] + 1}.."
             f"{r['steps']}. torch {r['torch']}, transformers {r['transformers']}, peft "
             f"{r['peft']}, liger-kernel {r['liger_kernel']}.", "",
             "| runner | status | tokens/s | vs hf_peft | step s | peak mem GiB | trainable "
             "params | total params | same tokens | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    ref = next((x.get("tokens_per_s") for x in r["runs"] if x["name"] == "hf_peft"), None)

    def num(v, fmt="{:,}"):
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    for x in r["runs"]:
        tps = x.get("tokens_per_s")
        lines.append(" | ".join([
            f"| {x['name']}", x["status"], num(tps, "{:,.0f}"),
            f"{tps / ref:.2f}x" if tps and ref else "-", num(x.get("step_time_s"), "{:.3f}"),
            num(x.get("peak_memory_gib"), "{:.2f}"), num(x.get("trainable")),
            num(x.get("total")), str(x.get("same_tokens_as_rows", "-")),
            f"{num(x.get('wall_s'), '{:.0f}')} |"]))
    lines += ["", "Notes: tokens/s counts the document tokens of each step's packed rows (no "
              "padding); 'same tokens' says the runner's per-step token counts equal the rows "
              "the parent built with sftctl's BatchPlan. Peak memory is "
              "torch.cuda.max_memory_allocated over the whole process: sftctl loads the base "
              "in fp32 before its lora plugin casts the frozen weights to bf16, so its figure "
              "includes that transient (4 bytes per parameter) when training needs less. "
              "Runners started while sftctl's extension was still building on the CPU: "
              + (", ".join(x["name"] for x in r["runs"]
                           if x.get("extension_build_running_at_start")) or "none") + "."]
    for x in r["runs"]:
        if x["status"] != "ok" or x.get("read_error"):
            lines += ["", f"`{x['name']}` {x['status']} (rc {x['rc']}); end of its log:", "",
                      "```", (x.get("log_tail") or "")[-1500:], "```"]
    s = next((x.get("sftctl") for x in r["runs"] if x["name"].startswith("sftctl") and x.get("sftctl")),
             None)
    if s:
        lines += ["", "sftctl's own report: `" + json.dumps(
            {k: v for k, v in s.items() if k != "versions"}) + "`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/sftctl_lora_bench"))
    p.add_argument("--runners", nargs="*", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="seconds per runner")
    p.add_argument("--budget-s", type=float, default=600,
                   help="skip runners that would start after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--build-marker", help="file that exists while sftctl's extension builds: "
                   "the sftctl runner waits until it is gone")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = hf_worker(json.loads(args.worker.read_text()))
        args.result.write_text(json.dumps(res))
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.smoke:
        args.seq_len, args.batch_size, args.steps, args.warmup = 256, 2, 4, 1

    import torch
    import transformers

    import_sftctl()
    t_start = time.monotonic()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke for the CPU)")
    inputs = prepare(work, args)
    spec = dict(inputs, device=device, seq_len=args.seq_len, batch_size=args.batch_size,
                steps=args.steps, seed=args.seed)
    print(f"inputs: {inputs['records']} records, tokens per step {inputs['step_tokens']}",
          flush=True)
    runs = []
    for name in args.runners:
        left = args.budget_s - (time.monotonic() - t_start)
        if left < 60:
            runs.append({"name": name, "status": "skipped", "rc": None, "wall_s": 0,
                         "log_tail": f"{left:.0f} s of --budget-s left"})
            continue
        res = run_one(name, spec, work, min(args.timeout, left), args.build_marker)
        runs.append(summarize(res, args.warmup, inputs["step_tokens"]))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("log_tail", "losses")}),
              flush=True)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(inputs["model_dir"])).parameters())

    def version(name):
        try:
            from importlib.metadata import version as v
            return v(name)
        except Exception:
            return None

    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = {"date": datetime.date.today().isoformat(), "card": card,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": version("peft"), "liger_kernel": version("liger-kernel"),
              "model_params": n_params, "config": inputs["config"], "seq_len": args.seq_len,
              "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
              "lr": LR, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": TARGETS},
              "step_tokens": inputs["step_tokens"], "runs": runs,
              "wall_s": round(time.monotonic() - t_start, 1)}
    stem = f"lora_{card.replace(' ', '_').replace('/', '_')}_{result['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
