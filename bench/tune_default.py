"""Tuning experiments for the embedded default (``sftctl train --plugin alpaca``).

A deliberately independent, minimal training loop (plain PyTorch: AdamW, cosine schedule with
linear warmup, loss on response tokens only via ``F.cross_entropy``, dynamic padding), so the
defaults are chosen without depending on the trainer. It builds the demo data, the project's
tokenizer and a tiny Llama through ``sftctl.plugins.alpaca.demo_data`` /
``sftctl.plugins.alpaca.demo_model``, trains for a fixed number of optimizer steps, then scores
the held-out split by greedy decoding (stop at newline or EOS) and exact match, per task.

The argument defaults are the chosen defaults (plugins/alpaca/default_config.yaml, tiny_llama.json):
    python bench/tune_default.py                       # the default run, scored
    python bench/tune_default.py --dim 128 --layers 4 --lr 3e-3 --steps 3000 --tag x
    python bench/tune_default.py --score RUN/model     # score a trainer checkpoint
On a shared machine use --threads 1 or OMP_WAIT_POLICY=PASSIVE (see the results file).
Each run appends one JSON line to bench/results/tuning_runs.jsonl; the table in
bench/results/default_tuning.md is written from those lines (``--table``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="intermediate size (default 3*dim)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-heldout", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--warmup", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="extra held-out evals during training")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="stop training after this many seconds (schedule still planned for --steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="")
    p.add_argument("--no-record", action="store_true", help="do not append to tuning_runs.jsonl")
    p.add_argument("--table", action="store_true", help="only print the table of tuning_runs.jsonl")
    p.add_argument("--score", metavar="CHECKPOINT",
                   help="only score a saved checkpoint (e.g. RUN/model) on the held-out split")
    p.add_argument("--results", default=str(RESULTS / "tuning_runs.jsonl"))
    p.add_argument("--max-words", type=int, default=None, help="override demo_data.MAX_WORDS")
    p.add_argument("--max-number", type=int, default=None, help="override demo_data.MAX_NUMBER")
    return p.parse_args(argv)


def encode(records, tok, demo_data):
    """(ids, n_prompt) per record: prompt ids followed by response ids and EOS."""
    out = []
    for r in records:
        p = tok(demo_data.format_prompt(r), add_special_tokens=False)["input_ids"]
        o = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + o, len(p)))
    return out


def collate(batch, pad_id):
    T = max(len(ids) for ids, _ in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((B, T), -100, dtype=torch.long)       # [B, T], already shifted
    attn = torch.zeros((B, T), dtype=torch.long)              # [B, T]
    for i, (ids, n_prompt) in enumerate(batch):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        attn[i, : len(ids)] = 1
        # logits[t] predicts ids[t+1]: response tokens (and EOS) are targets of positions n_prompt-1..
        labels[i, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]
    return input_ids, attn, labels


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    prog = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


@torch.no_grad()
def heldout_loss(model, enc, pad_id, device, bs=128):
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(enc), bs):
        ids, attn, labels = (x.to(device) for x in collate(enc[i : i + bs], pad_id))
        logits = model(input_ids=ids, attention_mask=attn).logits.float()  # [B, T, V]
        tot += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        n += int((labels != -100).sum())
    model.train()
    return tot / max(1, n)


@torch.no_grad()
def greedy_exact_match(model, tok, records, demo_data, device, max_new_tokens=24, bs=64):
    """Greedy decode each prompt (left padded, KV cache), cut at newline/EOS, compare exactly."""
    model.eval()
    tok.padding_side = "left"
    per_task = defaultdict(lambda: [0, 0])
    samples = []
    for i in range(0, len(records), bs):
        chunk = records[i : i + bs]
        enc = tok([demo_data.format_prompt(r) for r in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for r, row in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True).split("\n")[0]
            ok = text.strip() == r["output"]
            per_task[r["task"]][0] += ok
            per_task[r["task"]][1] += 1
            if len(samples) < 40:
                samples.append((r["task"], r["output"], text))
    tok.padding_side = "right"
    model.train()
    total = sum(c for c, _ in per_task.values()) / max(1, sum(n for _, n in per_task.values()))
    return total, {t: c / n for t, (c, n) in sorted(per_task.items())}, samples


def run(args):
    from sftctl import demo_data, demo_model

    # Data-mix experiments patch the generator's module constants (the tokenizer stays the default).
    tok = demo_model.build_tokenizer()
    if args.max_words:
        demo_data.MAX_WORDS = args.max_words
    if args.max_number:
        demo_data.MAX_NUMBER = args.max_number
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    train, heldout = demo_data.default_splits(args.seed, args.n_train, args.n_heldout)
    overrides = {"hidden_size": args.dim, "num_hidden_layers": args.layers,
                 "num_attention_heads": args.heads, "head_dim": args.dim // args.heads,
                 "num_key_value_heads": args.kv_heads or args.heads,
                 "intermediate_size": args.ffn or 3 * args.dim}
    model = demo_model.build_model(tok, args.seed, overrides=overrides).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    enc_train = encode(train, tok, demo_data)
    enc_held = encode(heldout, tok, demo_data)
    t_setup = time.perf_counter() - t0
    print(f"setup {t_setup:.1f}s params {n_params} vocab {len(tok)} train {len(train)} "
          f"heldout {len(heldout)}", flush=True)

    base_loss = heldout_loss(model, enc_held, tok.pad_token_id, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(args.seed)
    order, pos, epoch = list(range(len(enc_train))), len(enc_train), 0
    model.train()
    curve = []
    t_train, t_start, tokens = 0.0, time.perf_counter(), 0
    step = 0
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            rng.shuffle(order)
            pos, epoch = 0, epoch + 1
        batch = [enc_train[j] for j in order[pos : pos + args.batch_size]]
        pos += args.batch_size
        ids, attn, labels = (x.to(device) for x in collate(batch, tok.pad_token_id))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(input_ids=ids, attention_mask=attn).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())  # response only
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(attn.sum())
        if step % 25 == 0 or step == args.steps - 1:
            el = t_train + time.perf_counter() - t_start
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step, args):.2e} "
                  f"{el:.0f}s {tokens / el:.0f} tok/s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            t_train += time.perf_counter() - t_start
            em, _, _ = greedy_exact_match(model, tok, heldout, demo_data, device)
            hl = heldout_loss(model, enc_held, tok.pad_token_id, device)
            curve.append({"step": step + 1, "time_s": round(t_train, 1), "em": round(em, 4),
                          "heldout_loss": round(hl, 4)})
            print(f"  eval step {step + 1}: em {em:.3f} heldout loss {hl:.4f}", flush=True)
            t_start = time.perf_counter()
        if args.time_budget and t_train + time.perf_counter() - t_start > args.time_budget:
            print(f"time budget reached at step {step + 1}", flush=True)
            break
    t_train += time.perf_counter() - t_start
    t1 = time.perf_counter()
    hl = heldout_loss(model, enc_held, tok.pad_token_id, device)
    em, per_task, samples = greedy_exact_match(model, tok, heldout, demo_data, device)
    t_eval = time.perf_counter() - t1
    for task, want, got in samples[:15]:
        print(f"  {task:14s} want {want!r:40s} got {got!r}")
    print(f"exact match {em:.4f}  heldout loss {hl:.4f} (base {base_loss:.4f})  "
          f"train {t_train:.0f}s eval {t_eval:.0f}s")
    print("  " + "  ".join(f"{t}={v:.2f}" for t, v in per_task.items()))
    res = {
        "tag": args.tag, "device": str(device), "dim": args.dim, "layers": args.layers,
        "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
        "ffn": args.ffn or 3 * args.dim, "params": n_params, "n_train": len(train),
        "n_heldout": len(heldout), "batch_size": args.batch_size, "steps": step + 1,
        "planned_steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
        "precision": args.precision, "epochs": round((step + 1) * args.batch_size / len(train), 2),
        "setup_s": round(t_setup, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
        "tokens_per_s": round(tokens / t_train), "heldout_loss": round(hl, 4),
        "base_heldout_loss": round(base_loss, 4), "exact_match": round(em, 4),
        "per_task": {t: round(v, 3) for t, v in per_task.items()}, "curve": curve,
        "max_words": demo_data.MAX_WORDS, "max_number": demo_data.MAX_NUMBER,
        "load_avg": round(__import__("os").getloadavg()[0], 2),
    }
    if not args.no_record:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with Path(args.results).open("a") as f:
            f.write(json.dumps(res) + "\n")
    return res


def score(args):
    """Greedy exact match of a saved Hugging Face checkpoint on the default held-out split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftctl import demo_data

    torch.set_num_threads(args.threads)
    _, heldout = demo_data.default_splits(args.seed, args.n_train, args.n_heldout)
    tok = AutoTokenizer.from_pretrained(args.score)
    model = AutoModelForCausalLM.from_pretrained(args.score).to(args.device)
    em, per_task, samples = greedy_exact_match(model, tok, heldout, demo_data, torch.device(args.device))
    for task, want, got in samples[:10]:
        print(f"  {task:14s} want {want!r:40s} got {got!r}")
    print(f"{args.score}: exact match {em:.4f} on {len(heldout)} held-out records")
    print("  " + "  ".join(f"{t}={v:.2f}" for t, v in per_task.items()))


def table(path=RESULTS / "tuning_runs.jsonl"):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x]
    tasks = sorted({t for r in rows for t in r["per_task"]})
    head = ("| tag | device | dim×L×H (ffn) | params | bs | steps | lr | wd | train s | "
            "held-out loss (base) | EM | " + " | ".join(tasks) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['tag']} | {r['device']} | {r['dim']}×{r['layers']}×{r['heads']} ({r['ffn']}) | "
            f"{r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['steps']} | "
            f"{r['lr']:g} | {r['weight_decay']:g} | {r['train_s']:.0f} | {r['heldout_loss']:.3f} "
            f"({r['base_heldout_loss']:.2f}) | **{r['exact_match']:.3f}** | "
            + " | ".join(f"{r['per_task'].get(t, float('nan')):.2f}" for t in tasks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    a = parse_args()
    if a.table:
        print(table(a.results))
    elif a.score:
        score(a)
    else:
        run(a)
