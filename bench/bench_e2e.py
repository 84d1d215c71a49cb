"""End to end on one GPU: ``sftctl train`` vs a plain Hugging Face loop (stock, compiled blocks,
Liger, Liger + compiled blocks) vs TRL's SFTTrainer, on the same tokens (issue 14, part 5).

Run on the GPU machine through bench/run_e2e_device.sh (not a test):

    python bench/bench_e2e.py --out OUT                      # workloads a b c, every runner
    python bench/bench_e2e.py --out OUT --workloads a b --runners sftctl hf hf_liger
    python bench/bench_e2e.py --out /tmp/x --smoke           # tiny shapes on the CPU, seconds

Writes OUT/e2e_<card>_<date>.json and .md and prints the table.

Workloads
- a: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab
  128256, tied embeddings, rope theta 500000), 4 rows x 2048 tokens, every row one full example
  (no padding, no packing).
- b: the same model on packed real-length data: example lengths from a seeded lognormal (median
  250 tokens, sigma 1.0, clipped to [16, 2048]: many short examples, a long tail), about 30% of
  each example's tokens prompt (masked), packed first-fit into rows of 2048, 4 rows per step.
- c: Llama-3.1-8B shape (hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate 14336, vocab
  128256, untied head, rope theta 500000) on workload b's packed rows, activation checkpointing.
  fp32 weights + AdamW state alone are 16 B/parameter = 128 GB here: runners that do not fit on
  one H200 are recorded as OOM, not fatal.

Design choices
- One subprocess per run (``--worker``), each with its own timeout; a failure (OOM, timeout,
  missing package) is recorded with the end of its log and the next run starts. All runs are
  sequential on the one GPU. A global budget (``--budget-s``) skips runs that cannot finish in
  the time left (recorded as skipped): the device call has a hard limit.
- Identical tokens for every runner: the parent writes each workload's examples once, as an
  Alpaca JSONL file that ``sftctl train`` reads with its default format and a word-level
  tokenizer (one token per whitespace-separated word: ``w<id>`` words and the Alpaca template's
  words; vocabulary exactly 128256) saved in the model directory, and as the token ids and
  loss masks that this tokenizer gives (``tokens.json``), which the other runners read. The
  ids equal sftctl's tokenization: prompt segment + response segment + EOS (no BOS: the
  tokenizer adds none); the token counts in sftctl's summary.json are checked against the file.
- The plain HF runners pack with the same first-fit rule and permutation as sftctl's
  BatchPlan (``pack_first_fit``; the smoke run checks the rows are equal) and pass
  ``position_ids`` that restart per document with no attention mask: transformers then keeps
  attention inside documents (its packed-sequence path, sdpa here). Labels are the ids where
  the mask is 1, else -100 (HF shifts them inside the model); every document starts with a
  masked prompt token, so no target crosses a document. TRL gets the per-example ids and
  completion masks and packs them itself (``packing=True, padding_free=True``).
- Model init: the HF runners build the model from its config directly on the GPU (fp32 weights,
  seeded). ``sftctl train`` needs a model directory: it gets config.json, the tokenizer and an
  empty model.safetensors, and ``--allow-missing-weights`` makes transformers initialise every
  weight from the config (logged as missing by sftctl; no multi-GB file written or read).
- Every runner: fp32 master weights, bf16 autocast, fused AdamW (lr 1e-5, no weight decay),
  gradient clipping at 1.0, the same steps. sftctl runs with its defaults plus only what the
  workload needs (``--packing`` for b/c, ``--gradient-checkpointing`` for c) and, as a second
  variant, ``--compile``. What sftctl reports about its own paths (loss kernel, attention,
  fallbacks, compile) is copied from its summary.json.
- Throughput: median over the timed steps (after ``--warmup``) of tokens/s (all tokens in the
  rows, padding excluded) and trainable tokens/s (targets with loss). sftctl's figures come
  from its metrics.jsonl; the HF runners synchronise the GPU at the end of each step and time
  it with the host clock. Peak memory is ``torch.cuda.max_memory_allocated`` (sftctl reports
  the same counter).
- MFU = model FLOPs per second / 989.5e12 (H200 dense bf16 peak). Model FLOPs of a step =
  6 * N_matmul * tokens + 6 * layers * hidden * sum over documents of len^2 (causal attention:
  QK^T and PV, forward 2 * len^2 * hidden per layer, backward twice that). N_matmul = the
  parameters that multiply activations: all parameters minus the input embedding, plus the
  head (vocab x hidden) when it is tied to it. Activation-checkpointing recompute is not
  counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16 = 989.5e12  # H200 dense bf16 tensor-core peak (FLOP/s)

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5}

# the Alpaca prompt template without input (plugins/alpaca/template.py); its words are tokens
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE_WORDS = sorted(set(ALPACA_NO_INPUT.replace("{instruction}", "").split()))

RUNNERS = ("sftctl", "sftctl_compile", "sftctl_eager", "sftctl_chunk2048", "sftctl_chunk4096",
           "hf", "hf_compile",
           "hf_liger", "hf_liger_compile", "trl")
# sftctl with its defaults (--compile auto: on with CUDA), and named variants of it
SFTCTL_FLAGS = {"sftctl": [], "sftctl_compile": ["--compile"], "sftctl_eager": ["--no-compile"],
                "sftctl_chunk2048": ["--fused-head-chunk-rows", "2048"],
                "sftctl_chunk4096": ["--fused-head-chunk-rows", "4096"]}
# priority order of the full run (most important first; the budget cuts from the end); runs
# that need the sftctl build wait for it, others go first while it builds
ORDER = ["a/hf", "a/hf_liger", "b/hf", "b/hf_liger", "a/sftctl", "b/sftctl", "a/sftctl_compile",
         "b/sftctl_compile", "a/hf_compile", "a/hf_liger_compile", "b/hf_compile",
         "b/hf_liger_compile", "b/trl", "c/sftctl", "c/hf_liger", "c/hf", "c/sftctl_compile",
         "c/hf_liger_compile"]


# ------------------------------------------------------------------------------- data, model

def word_vocab(vocab_size: int) -> dict[str, int]:
    """Specials (ids 0..3), the template's words, then ``w<id>`` for every remaining id."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in TEMPLATE_WORDS:
        vocab[w] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    assert len(vocab) == vocab_size
    return vocab


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(word_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=8192,
                                   padding_side="right")


def make_examples(kind: str, n: int, seq_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Alpaca records plus their exact token ids and masks. ``kind``: full (every example
    ``seq_len`` tokens) or skewed (lognormal lengths). About 30% of each example is prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tmpl = ALPACA_NO_INPUT.split("{instruction}")
    pre_ids = [4 + TEMPLATE_WORDS.index(w) for w in tmpl[0].split()]
    post_ids = [4 + TEMPLATE_WORDS.index(w) for w in tmpl[1].split()]
    fixed = len(pre_ids) + len(post_ids)
    first = 4 + len(TEMPLATE_WORDS)
    if kind == "full":
        lengths = np.full(n, seq_len)
    else:
        lengths = np.clip(np.round(rng.lognormal(math.log(250), 1.0, n)), 16, seq_len)
        lengths = np.maximum(lengths, fixed + 3)  # the template, one instruction word, a reply
    out = []
    for L in lengths.astype(int):
        n_prompt = max(fixed + 1, int(round(0.3 * L)))
        n_instr = n_prompt - fixed
        n_resp = L - n_prompt - 1  # EOS closes the response
        instr = rng.integers(first, vocab_size, n_instr).tolist()
        resp = rng.integers(first, vocab_size, n_resp).tolist()
        ids = pre_ids + instr + post_ids + resp + [2]
        mask = [0] * n_prompt + [1] * (n_resp + 1)
        out.append({"record": {"instruction": " ".join(f"w{i}" for i in instr),
                               "output": " ".join(f"w{i}" for i in resp)},
                    "ids": ids, "mask": mask})
    return out


def pack_first_fit(order, lengths, capacity: int, open_rows: int = 16) -> list[list[int]]:
    """The rule of sftctl's BatchPlan (core/data/batching.py): first fit over 16 open rows,
    closing the fullest when none fits. Kept here so the HF runners need no sftctl build; the
    smoke run checks it against sftctl's own."""
    done, rows, space = [], [], []
    for i in order:
        n = int(lengths[i])
        for j, s in enumerate(space):
            if n <= s:
                rows[j].append(int(i))
                space[j] -= n
                break
        else:
            if len(rows) >= open_rows:
                j = min(range(len(space)), key=space.__getitem__)
                done.append(rows.pop(j))
                space.pop(j)
            rows.append([int(i)])
            space.append(capacity - n)
    done.extend(rows)
    return done


def plan_rows(lengths, seq_len: int, packing: bool, seed: int) -> list[list[int]]:
    import numpy as np

    order = np.random.default_rng([seed, 0]).permutation(len(lengths))  # BatchPlan.order(0)
    return pack_first_fit(order, lengths, seq_len) if packing else [[int(i)] for i in order]


def prepare(work: Path, args) -> dict:
    """Write each workload's data (JSONL for sftctl, tokens.json for the others) and a model
    directory per shape (config, tokenizer, empty weights file). Returns the workload table."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shapes = {"1b": TINY if args.smoke else LLAMA_1B, "8b": TINY if args.smoke else LLAMA_8B}
    vocab = shapes["1b"]["vocab_size"]
    tok = build_tokenizer(vocab)
    models = {}
    for name, shape in shapes.items():
        d = work / f"model_{name}"
        if not (d / "config.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        use_cache=False).save_pretrained(d)
            save_file({}, str(d / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(d)
        models[name] = d
    seq = args.seq_len
    data = {}
    for kind, n in (("full", args.full_examples), ("skewed", args.skewed_examples)):
        ex = make_examples(kind, n, seq, vocab, seed=7 if kind == "full" else 11)
        # the ids must be what sftctl's tokenizer gives for the record (prompt, response, EOS)
        for e in ex[:50]:
            p = tok(ALPACA_NO_INPUT.format(instruction=e["record"]["instruction"]),
                    add_special_tokens=False)["input_ids"]
            r = tok(e["record"]["output"], add_special_tokens=False)["input_ids"]
            if p + r + [tok.eos_token_id] != e["ids"]:
                raise SystemExit(f"prepare: tokenizer disagrees with the generated ids ({kind})")
        jl = work / f"data_{kind}.jsonl"
        jl.write_text("".join(json.dumps(e["record"]) + "\n" for e in ex))
        tj = work / f"tokens_{kind}.json"
        tj.write_text(json.dumps({"ids": [e["ids"] for e in ex], "mask": [e["mask"] for e in ex]}))
        lens = [len(e["ids"]) for e in ex]
        data[kind] = {"jsonl": str(jl), "tokens": str(tj), "examples": n,
                      "tokens_total": sum(lens),
                      "trainable_total": sum(sum(e["mask"][1:]) for e in ex),
                      "length_median": statistics.median(lens), "length_mean": sum(lens) / n,
                      "length_max": max(lens), "length_min": min(lens)}
    return {"a": {"model": str(models["1b"]), "data": data["full"], "packing": False,
                  "ckpt": False, "shape": "1b"},
            "b": {"model": str(models["1b"]), "data": data["skewed"], "packing": True,
                  "ckpt": False, "shape": "1b"},
            "c": {"model": str(models["8b"]), "data": data["skewed"], "packing": True,
                  "ckpt": True, "shape": "8b"}}


def flops_per_token_params(cfg) -> int:
    """N_matmul of the MFU formula (module docstring)."""
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    return L * per_layer + h + V * h  # + final norm + head (tied or not, it multiplies)


def step_flops(cfg, doc_lengths: list[int]) -> float:
    n = sum(doc_lengths)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * \
        sum(x * x for x in doc_lengths)
    return 6.0 * flops_per_token_params(cfg) * n + attn


def check_packed_attention(wl: dict, row: list[int]) -> None:
    """The HF runners' packed rows (position_ids restarting per document, no mask) must give each
    document the loss it has alone: attention never crosses documents (fp64, CPU)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    tok = json.loads(Path(wl["data"]["tokens"]).read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(AutoConfig.from_pretrained(wl["model"]),
                                          attn_implementation="sdpa", dtype=torch.float64)
    ids = [tok["ids"][i] for i in row]
    labels = [[x if m else -100 for x, m in zip(tok["ids"][i], tok["mask"][i])] for i in row]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sum(ids, [])]),
                       position_ids=torch.tensor([sum((list(range(len(x))) for x in ids), [])])
                       ).logits[0]  # [T, V]
        o = 0
        for x, lab in zip(ids, labels):
            alone = model(input_ids=torch.tensor([x])).logits[0]  # [len, V]
            err = (logits[o:o + len(x)] - alone).abs().max().item()
            if err > 1e-9:
                raise SystemExit(f"smoke: packed attention crosses documents (max diff {err})")
            o += len(x)
    print(f"smoke: packed logits equal per-document logits ({len(row)} documents)", flush=True)


# ------------------------------------------------------------------------------------ workers

def hf_worker(spec: dict) -> dict:
    """A plain HF loop (optionally Liger, compiled blocks, checkpointing); prints a JSON line."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    dev = torch.device(spec["device"])
    cfg = AutoConfig.from_pretrained(spec["model"])
    cfg.use_cache = False
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # rope, rms_norm, swiglu, fused linear cross-entropy
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=spec["attn"],
                                              dtype=torch.float32)
    model.train()
    if spec["ckpt"]:  # transformers 5 renamed it (as in sftctl.training.model)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec["compile"]:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    tok = json.loads(Path(spec["tokens"]).read_text())
    ids_all, mask_all = tok["ids"], tok["mask"]
    rows = plan_rows([len(x) for x in ids_all], spec["seq_len"], spec["packing"], spec["seed"])
    B = spec["batch_size"]
    batches = [rows[i:i + B] for i in range(0, len(rows), B)]
    if len(batches) < spec["steps"]:
        raise SystemExit(f"only {len(batches)} batches for {spec['steps']} steps")
    ac = torch.autocast(dev.type, dtype=torch.bfloat16) if spec["bf16"] else torch.autocast(
        dev.type, enabled=False)
    steps = []
    for s in range(spec["steps"]):
        rows_b = batches[s]
        T = max(sum(len(ids_all[i]) for i in r) for r in rows_b)
        ids = torch.zeros(len(rows_b), T, dtype=torch.long)        # [B, T]
        labels = torch.full((len(rows_b), T), -100, dtype=torch.long)  # [B, T]
        pos = torch.zeros(len(rows_b), T, dtype=torch.long)        # [B, T]
        docs = []
        for b, r in enumerate(rows_b):
            o = 0
            for i in r:
                x, m = ids_all[i], mask_all[i]
                ids[b, o:o + len(x)] = torch.tensor(x)
                labels[b, o:o + len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), -100)
                pos[b, o:o + len(x)] = torch.arange(len(x))
                docs.append(len(x))
                o += len(x)
            pos[b, o:] = torch.arange(T - o)  # padding: its own document, no targets
        n_tok, n_train = sum(docs), int((labels[:, 1:] != -100).sum())
        ids, labels, pos = ids.to(dev), labels.to(dev), pos.to(dev)
        t0 = time.perf_counter()
        with ac:
            kw = {"position_ids": pos} if spec["packing"] else {}
            loss = model(input_ids=ids, labels=labels, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss)  # syncs: the step is done
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if s == 0:
            first = time.perf_counter() - t_start
        steps.append({"time": dt, "tokens": n_tok, "trainable": n_train, "docs": docs,
                      "loss": lv})
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"steps": steps, "peak_memory_bytes": peak, "time_to_first_step_s": first,
            "attention": f"transformers {spec['attn']}" + (
                " (packed: position_ids, no mask)" if spec["packing"] else ""),
            "loss_path": "liger fused linear cross-entropy" if spec["liger"] else
            "transformers ForCausalLMLoss (full logits)"}


def trl_worker(spec: dict) -> dict:
    """TRL's SFTTrainer, padding-free packing, on the same examples (ids + completion masks)."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_start = time.perf_counter()
    dev = torch.device(spec["device"])
    cfg = AutoConfig.from_pretrained(spec["model"])
    cfg.use_cache = False
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=spec["attn"],
                                              dtype=torch.float32)
    tok = json.loads(Path(spec["tokens"]).read_text())
    ds = Dataset.from_dict({"input_ids": tok["ids"], "completion_mask": tok["mask"]})
    counts = {"tokens": 0, "trainable": 0}

    def count(_mod, args, kwargs):  # tokens the model sees (padding-free: no padding)
        ids = kwargs.get("input_ids", args[0] if args else None)
        lab = kwargs.get("labels")
        counts["tokens"] += int(ids.numel())
        if lab is not None:
            counts["trainable"] += int((lab[..., 1:] != -100).sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.t0 = time.perf_counter()
            counts.update(tokens=0, trainable=0)

        def on_step_end(self, a, state, control, **kw):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if not steps:
                self.first = time.perf_counter() - t_start
            steps.append({"time": time.perf_counter() - self.t0, "tokens": counts["tokens"],
                          "trainable": counts["trainable"], "docs": None})

    conf = SFTConfig(output_dir=spec["workdir"], max_steps=spec["steps"],
                     per_device_train_batch_size=spec["batch_size"], learning_rate=1e-5,
                     weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
                     optim="adamw_torch_fused" if dev.type == "cuda" else "adamw_torch",
                     bf16=spec["bf16"], logging_steps=1, report_to="none", save_strategy="no",
                     packing=True, padding_free=True, max_length=spec["seq_len"],
                     completion_only_loss=True, gradient_checkpointing=spec["ckpt"],
                     dataloader_num_workers=0, seed=spec["seed"], use_cpu=dev.type == "cpu",
                     dataset_num_proc=1)
    tr = SFTTrainer(model=model, args=conf, train_dataset=ds,
                    processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                    callbacks=[timer := Timer()])
    tr.train()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"steps": steps, "peak_memory_bytes": peak,
            "time_to_first_step_s": getattr(timer, "first", None),
            "attention": f"transformers {spec['attn']} (TRL padding_free packing, "
                         f"strategy {getattr(conf, 'packing_strategy', '?')})",
            "loss_path": "TRL SFTTrainer compute_loss (completion_only_loss)",
            "trl_losses": [h.get("loss") for h in tr.state.log_history if "loss" in h]}


def sftctl_run(spec: dict, timeout: float, log_path: Path) -> dict:
    """The real CLI in a subprocess; figures from its metrics.jsonl and summary.json."""
    out = Path(spec["workdir"]) / "run"
    cmd = [sys.executable, "-m", "sftctl", "train", "--model", spec["model"], "--data",
           spec["jsonl"], "--output-dir", str(out), "--overwrite", "--no-eval",
           "--no-initial-eval", "--quiet", "--allow-missing-weights",
           "--max-seq-len", str(spec["seq_len"]), "--batch-size", str(spec["batch_size"]),
           "--max-steps", str(spec["steps"]), "--lr", "1e-5", "--seed", str(spec["seed"]),
           "--device", spec["device"]] + spec["extra"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               SFTCTL_DISABLE_PLUGIN_AUTOLOAD="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(Path(spec["workdir"]) / "hf_cache"))
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO,
                           timeout=timeout)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", _text(e)
    log_path.write_text(" ".join(cmd) + "\n" + text)
    res = {"command": "python -m sftctl " + " ".join(cmd[3:]), "rc": rc,
           "wall_s": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(out / "model", ignore_errors=True)  # the final model (8B: 32 GB): disk
    if rc != 0:
        res["error"] = _error_tail(text)
        return res
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    steps = [m for m in metrics if m.get("kind") == "train"]
    summary = json.loads((out / "summary.json").read_text())
    res["steps"] = [{"time": m["tokens"] / m["tokens_per_s"], "tokens": m["tokens"],
                     "trainable": m.get("trainable_tokens"), "docs": None, "loss": m["loss"]}
                    for m in steps]
    res["peak_memory_bytes"] = summary.get("peak_memory_bytes")
    if steps and "time" in steps[0]:  # seconds from the run's start to the first step's end
        res["time_to_first_step_s"] = steps[0]["time"]
    keep = ("loss_kernel", "loss_impl", "fallbacks", "compiled", "precision", "master_weights",
            "peak_memory_kind", "wall_time_s", "train_time_s", "parameters", "examples", "tokens",
            "trainable_tokens")
    res["summary"] = {k: v for k, v in summary.items()
                      if k in keep or any(w in k for w in ("attn", "attention", "head", "sync",
                                                           "loss_path", "varlen"))}
    res["summary"]["examples_train"] = (summary.get("examples_detail") or {}).get("train")
    res["attention"] = attention_label(summary)
    res["loss_path"] = f"{summary.get('loss_impl')} ({summary.get('loss_kernel')})"
    return res


def attention_label(summary: dict) -> str:
    """What sftctl's summary.json says about its attention path, in one short string."""
    v = next((v for k, v in summary.items() if "attn" in k or "attention" in k), None)
    if isinstance(v, dict):
        return (f"{v.get('implementation')}{' varlen' if v.get('varlen') else ''}"
                f"{' (' + str(v['kernel']) + ')' if v.get('kernel') else ''}: "
                f"{v.get('description', '')}")
    return "not in summary.json" if v is None else str(v)


def _text(e: subprocess.TimeoutExpired) -> str:
    return "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                   for x in (e.stdout, e.stderr))


def _error_tail(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip() and "it/s]" not in x]
    oom = [x for x in lines if "OutOfMemoryError" in x or "out of memory" in x]
    errs = [x for x in lines if re.match(r"^\s*(\[\w+\]:?\s*)?[\w.]*(Error|Exception)\b", x)]
    last = [x for x in lines if not x.startswith((" ", "\t", "Traceback"))][-3:]
    return (("OOM: " + oom[-1][:300] + " | ") if oom else "") + \
        (("first error: " + errs[0].strip()[:300] + " | ") if errs else "") + \
        " / ".join(last)[-900:]


# ------------------------------------------------------------------------------------- parent

def run_one(key: str, wl: dict, args, work: Path, timeout: float) -> dict:
    workload, runner = key.split("/")
    d = work / key.replace("/", "_")
    d.mkdir(parents=True, exist_ok=True)
    seq, bs = args.seq_len, args.batch_size
    steps = args.warmup + args.steps
    base = {"model": wl["model"], "tokens": wl["data"]["tokens"], "jsonl": wl["data"]["jsonl"],
            "seq_len": seq, "batch_size": bs, "steps": steps, "seed": 1, "packing": wl["packing"],
            "ckpt": wl["ckpt"], "device": args.device, "bf16": not args.smoke,
            "workdir": str(d), "attn": "sdpa"}
    log_path = work / f"{key.replace('/', '_')}.log"
    if runner.startswith("sftctl"):
        extra = (["--packing"] if wl["packing"] else []) + \
            (["--gradient-checkpointing"] if wl["ckpt"] else []) + \
            SFTCTL_FLAGS[runner] + \
            (["--precision", "fp32"] if args.smoke else [])
        res = sftctl_run(dict(base, extra=extra), timeout, log_path)
    else:
        spec = dict(base, liger="liger" in runner, compile=runner.endswith("compile"),
                    kind="trl" if runner == "trl" else "hf")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                               env=dict(os.environ, TOKENIZERS_PARALLELISM="false",
                                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", _text(e)
        log_path.write_text(" ".join(cmd) + "\n" + text)
        res = {"command": f"bench_e2e worker {runner}", "rc": rc,
               "wall_s": round(time.perf_counter() - t0, 1)}
        line = next((x for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
        if rc == 0 and line:
            res.update(json.loads(line[len("RESULT "):]))
        else:
            res["error"] = _error_tail(text)
    res.update(workload=workload, runner=runner)
    return res


def summarize(res: dict, cfg, warmup: int) -> dict:
    steps = res.get("steps") or []
    timed = steps[warmup:]
    if not timed:
        return res
    med = lambda xs: statistics.median(xs)
    res["timed_steps"] = len(timed)
    res["tokens_per_s"] = med([s["tokens"] / s["time"] for s in timed])
    if all(s.get("trainable") is not None for s in timed):
        res["trainable_tokens_per_s"] = med([s["trainable"] / s["time"] for s in timed])
    res["step_time_s"] = med([s["time"] for s in timed])
    res["tokens_per_step"] = med([s["tokens"] for s in timed])
    # MFU: per-step model FLOPs over step time; sftctl/TRL do not report document lengths, so
    # the attention term uses this runner's own documents when known, else the token-weighted
    # mean document length of the workload (``doc_len2_per_token``)
    fl = []
    for s in timed:
        if s.get("docs"):
            fl.append(step_flops(cfg, s["docs"]) / s["time"])
        else:
            n = s["tokens"]
            attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * \
                res["_len2_per_token"] * n
            fl.append((6.0 * flops_per_token_params(cfg) * n + attn) / s["time"])
    res["model_tflops"] = round(med(fl) / 1e12, 1)
    res["mfu"] = round(med(fl) / PEAK_BF16, 3)
    if res.get("peak_memory_bytes"):
        res["peak_memory_gib"] = round(res["peak_memory_bytes"] / 2**30, 2)
    res["losses"] = [s.get("loss") for s in steps]
    for s in res["steps"]:
        s.pop("docs", None)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/sftctl_e2e"))
    p.add_argument("--workloads", nargs="*", default=["a", "b", "c"])
    p.add_argument("--runners", nargs="*", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--full-examples", type=int, default=64)
    p.add_argument("--skewed-examples", type=int, default=1600)
    p.add_argument("--timeout", type=float, default=150, help="seconds per 1B run")
    p.add_argument("--timeout-8b", type=float, default=200, help="seconds per 8B run")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="wall seconds for all runs; runs that cannot start with at least "
                        "--min-run-s (8B: twice that) left are skipped and recorded")
    p.add_argument("--min-run-s", type=float, default=45)
    p.add_argument("--build-done", type=Path, default=None,
                   help="file whose existence means the sftctl build finished (sftctl runs "
                        "wait for it; the other runners go first)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (fp32), 2+2 steps: checks the script, not speed")
    p.add_argument("--tag", default="", help="appended to the result files' names (one call "
                                             "of several)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        res = trl_worker(spec) if spec["kind"] == "trl" else hf_worker(spec)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.out is None:
        p.error("--out is required")
    t_begin = time.perf_counter()
    if args.smoke:
        args.device, args.steps, args.warmup = "cpu", 2, 2
        args.seq_len, args.full_examples, args.skewed_examples = 128, 16, 200
        args.work = args.work.with_name(args.work.name + "_smoke")
    import torch
    from transformers import AutoConfig

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    card = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    wls = prepare(args.work, args)
    if args.smoke:  # the bench's packing must be sftctl's (identical rows for every runner)
        sys.path.insert(0, str(REPO))
        import numpy as np

        from sftctl.data.batching import BatchPlan

        lens = np.array([len(x) for x in json.loads(Path(wls["b"]["data"]["tokens"])
                                                    .read_text())["ids"]])
        ref = BatchPlan(lens, 4, args.seq_len, True, 1).rows(0)
        if ref != plan_rows(lens, args.seq_len, True, 1):
            raise SystemExit("smoke: the bench's packing differs from sftctl's BatchPlan")
        print("smoke: packed rows equal sftctl's BatchPlan rows", flush=True)
        check_packed_attention(wls["b"], max(plan_rows(lens, args.seq_len, True, 1), key=len))
    cfgs = {k: AutoConfig.from_pretrained(w["model"]) for k, w in wls.items()}
    for k, w in wls.items():  # token-weighted mean document length, for the MFU of sftctl/TRL
        ids = json.loads(Path(w["data"]["tokens"]).read_text())["ids"]
        w["len2_per_token"] = sum(len(x) ** 2 for x in ids) / sum(len(x) for x in ids)
    todo = [k for k in ORDER if k.split("/")[0] in args.workloads and
            k.split("/")[1] in args.runners]
    todo += [f"{w}/{r}" for r in args.runners for w in args.workloads  # the rest, as asked
             if f"{w}/{r}" not in ORDER]
    results, pending = [], list(todo)

    def dump(final: bool) -> None:
        """Write the JSON and .md (after every run too: an outer timeout keeps what ran)."""
        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
        for mod in ("transformers", "liger_kernel", "trl", "datasets", "peft", "accelerate"):
            try:
                from importlib.metadata import version

                versions[mod] = version(mod.replace("_", "-"))
            except Exception:
                versions[mod] = None
        result = {"date": datetime.date.today().isoformat(), "card": card, "versions": versions,
                  "smoke": args.smoke, "steps_timed": args.steps, "warmup_steps": args.warmup,
                  "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "peak_flops": PEAK_BF16,
                  "mfu_formula": "(6 * N_matmul * tokens + 6 * layers * hidden * "
                                 "sum(doc_len^2)) / step_time / 989.5e12; N_matmul = parameters "
                                 "- input embedding + head (tied head counted once as a matmul); "
                                 "checkpointing recompute not counted",
                  "workloads": {k: {kk: vv for kk, vv in w.items()} | {
                      "n_matmul_params": flops_per_token_params(cfgs[k])} for k, w in wls.items()},
                  "wall_s": round(time.perf_counter() - t_begin, 1), "runs": results}
        stem = f"e2e_{card.replace(' ', '_').replace('/', '_')}_{result['date']}" + \
            ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else "")
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        md = markdown(result)
        (args.out / f"{stem}.md").write_text(md)
        if final:
            print(md)

    while pending:
        built = args.build_done is None or args.build_done.exists()
        key = next((k for k in pending if built or not k.split("/")[1].startswith("sftctl")),
                   None)
        if key is None:
            time.sleep(2)
            continue
        pending.remove(key)
        wl = wls[key.split("/")[0]]
        left = args.budget_s - (time.perf_counter() - t_begin)
        big = wl["shape"] == "8b" and not args.smoke
        if left < args.min_run_s * (2 if big else 1):
            results.append({"workload": key[0], "runner": key.split("/")[1], "rc": "skipped",
                            "error": f"skipped: {left:.0f} s of the budget left"})
            print(f"[{key}] skipped ({left:.0f} s left)", flush=True)
            continue
        timeout = min(args.timeout_8b if big else args.timeout, left)
        print(f"[{key}] start (timeout {timeout:.0f} s)", flush=True)
        res = run_one(key, wl, args, args.work, timeout)
        res["_len2_per_token"] = wl["len2_per_token"]
        res = summarize(res, cfgs[key[0]], args.warmup)
        res.pop("_len2_per_token", None)
        results.append(res)
        if res.get("tokens_per_s"):
            print(f"[{key}] {res['tokens_per_s']:.0f} tok/s, mfu {res['mfu']}, peak "
                  f"{res.get('peak_memory_gib')} GiB, wall {res['wall_s']} s", flush=True)
        else:
            print(f"[{key}] FAILED rc={res.get('rc')}: {res.get('error', '')[-400:]}", flush=True)
        if key.split("/")[1].startswith("sftctl") and res.get("summary"):
            want = wl["data"]
            ex = res["summary"].get("examples_train") or {}
            res["data_check"] = {"records": ex.get("records"), "used": ex.get("used"),
                                 "truncated": ex.get("truncated"), "tokens": ex.get("tokens"),
                                 "expected_tokens": want["tokens_total"],
                                 "trainable": ex.get("trainable_tokens"),
                                 "expected_trainable": want["trainable_total"],
                                 "equal": ex.get("tokens") == want["tokens_total"] and
                                 ex.get("trainable_tokens") == want["trainable_total"]}
        dump(final=False)
    dump(final=True)
    return 0


def markdown(r: dict) -> str:
    names = {"a": "a: 1B shape, full rows 4 x 2048", "b": "b: 1B shape, packed skewed lengths",
             "c": "c: 8B shape, packed, activation checkpointing"}
    lines = [f"# sftctl end to end vs HF / Liger / TRL, {r['card']}, {r['date']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
             f"Median over {r['steps_timed']} timed steps after {r['warmup_steps']} warm-up "
             f"steps; batch {r['batch_size']} rows x {r['seq_len']} tokens. MFU = "
             + r["mfu_formula"] + ".", ""]
    for k, w in r["workloads"].items():
        d = w["data"]
        lines.append(f"- {names.get(k, k)}: {d['examples']} examples, {d['tokens_total']} tokens "
                     f"({d['trainable_total']} trainable), lengths median {d['length_median']}, "
                     f"mean {d['length_mean']:.0f}, max {d['length_max']}; "
                     f"N_matmul {w['n_matmul_params'] / 1e9:.3f}B")
    lines += ["", "| workload | runner | tokens/s | trainable tok/s | MFU | peak GiB | "
                  "first step s | attention | loss | note |",
              "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for x in r["runs"]:
        if x.get("tokens_per_s"):
            note = ""
            if "data_check" in x:
                note = "tokens = file" if x["data_check"]["equal"] else "TOKENS DIFFER"
            ttfs = x.get("time_to_first_step_s")
            lines.append(
                f"| {x['workload']} | {x['runner']} | {x['tokens_per_s']:,.0f} | "
                f"{x.get('trainable_tokens_per_s', 0):,.0f} | {x['mfu']:.3f} | "
                f"{x.get('peak_memory_gib', '-')} | {'-' if ttfs is None else f'{ttfs:.0f}'} | "
                f"{x.get('attention', '-')} | {x.get('loss_path', '-')} | {note} |")
        else:
            err = str(x.get("error", ""))[:160].replace("|", "/")
            lines.append(f"| {x['workload']} | {x['runner']} | – | – | – | – | – | – | – | "
                         f"{x.get('rc')}: {err} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
