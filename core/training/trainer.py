"""The SFT trainer: setup (every input checked before the first step), the loop, the final save.

Design choices
- Everything that a resumable checkpoint needs lives in two places: the objects the trainer holds
  (model, optimizer, scheduler, grad scaler) and ``TrainState`` (step, epoch, micro-batch
  position inside the epoch, token counters, metrics history, wall time). ``Trainer.state_dict``
  / ``load_state_dict`` cover both plus every RNG, and the data order is a pure function of
  (seed, epoch), so restoring them continues the exact same run.
- ``setup`` does all the checking and loading (plugins' registrations, model path, tokenizer,
  data, optimizer) before any step, so bad input never leaves a trained-looking directory.
- One optimizer step = ``grad_accum`` micro-batches. Their labels are built first, the number of
  trainable targets is summed (and, through the strategy, summed over ranks) into a tensor, and
  each micro-batch's loss is ``sum / that count``: the accumulated gradient is exactly that of the
  token-mean loss of the whole step. No host sync is needed for it.
- Mixed precision: weights and optimizer state stay fp32; the forward runs under autocast
  (bf16/fp16); fp16 uses a GradScaler whose scale is handed to the fused loss as ``grad_scale``
  so the scaled backward costs no extra pass over the logits gradient.
- Distribution goes through ``Strategy`` (``distributed.py``): the model is wrapped by it, the
  batch plan shards rows by rank, and only rank 0 logs, shows progress and writes files.
- Metrics go through the ``sftctl_step_end`` / ``sftctl_evaluate`` hooks (the JSONL writer is a
  built-in plugin) and into ``state.history``.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import OMP_WAIT_POLICY_REASON
from . import atomic as ckpt
from . import guards
from ..data import BatchPlan, PreparedData, collate, prepare_data
from .distributed import Strategy, select_strategy
from ..errors import ConfigError, ModelError, TrainingError
from .._runtime import cpu_threads_info
from .loss import kernel_name, resolve_impl, sft_labels, token_loss

log = logging.getLogger("sftctl")

EMBEDDED_MODEL = "embedded:tiny_llama"


@dataclass
class TrainState:
    """Counters and history of a run: what, with the trainer's objects, makes a run resumable."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0                # current epoch
    micro_in_epoch: int = 0       # micro-batches of the current epoch already consumed
    tokens_total: int = 0         # input tokens processed (padding excluded), this rank
    trainable_total: int = 0      # trainable targets seen (global), known at log steps
    examples_total: int = 0
    train_time_s: float = 0.0     # wall time spent in training steps (over resumes)
    history: list[dict] = field(default_factory=list)
    nonfinite_skipped: int = 0    # steps not applied because of a non-finite loss/grad norm
    nonfinite_in_a_row: int = 0
    nonfinite_last_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if not hasattr(self, k):
                raise ValueError(f"unknown TrainState field {k!r}")
            setattr(self, k, v)


def _autocast_dtype(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "datasets", "pluggy", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        from importlib.metadata import version

        out["sftctl"] = version("sftctl")
    except Exception:
        out["sftctl"] = None
    out["cuda"] = torch.version.cuda
    return out


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kb) * (1 if sys.platform == "darwin" else 1024), "cpu_max_rss"


def compile_blocks(model: torch.nn.Module) -> str:
    """``torch.compile`` the ``forward`` of each transformer block in place; returns what was
    compiled, for the log and the summary.

    Only ``forward`` is replaced (an instance attribute), not ``__call__``: module hooks (FSDP2's
    all-gathers, DDP's, gradient checkpointing's) stay eager around the compiled code, and
    parameter names (hence checkpoints) do not change, which wrapping blocks in an
    ``OptimizedModule`` would do. Blocks of one class share their compiled code.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        model.forward = torch.compile(model.forward)
        return f"the whole model's forward ({type(model).__name__}; it names no block class)"
    for block in blocks:
        block.forward = torch.compile(block.forward)
    kinds = sorted({type(b).__name__ for b in blocks})
    return f"{len(blocks)} blocks ({', '.join(kinds)}), forward of each"


class Trainer:
    """Build with a validated ``RunConfig`` and a loaded plugin manager; ``setup()``, ``train()``."""

    def __init__(self, config, pm, strategy: Strategy | None = None, *,
                 benchmarks: list[dict] | None = None):
        self.config = config
        self.pm = pm
        self.strategy = strategy or select_strategy(config)
        self.out_dir = Path(config.train.output_dir)
        self.state = TrainState()
        self.model = None
        self.tokenizer = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
        self.data: PreparedData | None = None
        self.base_model: str | None = None
        self.extras: dict[str, Any] = {}  # per-run storage for plugins
        self.stop_reason: str | None = None  # set by request_stop (e.g. an early-stopping plugin)
        self._t0 = time.time()
        self.benchmarks = list(benchmarks or [])  # recorded in summary.json for the evaluation
        # historic: plugins registered later still see it; a plugin may reject the config here
        pm.hook.sftctl_configure.call_historic(kwargs=dict(config=config, pm=pm))

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    def request_stop(self, reason: str) -> None:
        """End training after the current step (then validate and save as usual)."""
        self.stop_reason = reason

    @property
    def unwrapped_model(self):
        return self.strategy.unwrap(self.model)

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.config
        formats = self.pm.dataset_formats()
        if cfg.data.format is None:  # the CLI resolves it; API users get the default format
            cfg.data.format = "alpaca"
        if cfg.data.format not in formats:
            raise ConfigError(f"data.format: unknown dataset format {cfg.data.format!r}; "
                              f"registered: {', '.join(sorted(formats))}")
        self.format = formats[cfg.data.format]
        optimizers = self.pm.optimizers()
        if cfg.optim.name not in optimizers:
            raise ConfigError(f"optim.name: unknown optimizer {cfg.optim.name!r}; registered: "
                              f"{', '.join(sorted(optimizers))}")
        schedulers = self.pm.schedulers()
        if cfg.optim.scheduler not in schedulers:
            raise ConfigError(f"optim.scheduler: unknown scheduler {cfg.optim.scheduler!r}; "
                              f"registered: {', '.join(sorted(schedulers))}")
        if cfg.train.loss_impl == "fused":
            try:
                from .. import ops  # noqa: F401
            except Exception as e:
                raise ConfigError(f"--loss-impl fused needs the compiled extension sftctl._C, "
                                  f"which failed to load ({type(e).__name__}: {e}); rebuild it "
                                  "(pip install --no-build-isolation -e .) or pass --loss-impl "
                                  "torch") from None
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if OMP_WAIT_POLICY_REASON and self.is_main:
            log.info("OMP_WAIT_POLICY=PASSIVE: %s (set OMP_WAIT_POLICY to choose yourself)",
                     OMP_WAIT_POLICY_REASON)
        self.device = self.strategy.device(cfg.train.device)
        self.precision, self.amp_dtype = _autocast_dtype(cfg.train.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cuda" and \
                not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision: bf16 is not supported by this GPU; use fp16")
        ckpt.seed_everything(cfg.train.seed)

        model_src = self._model_source()
        self.tokenizer = self._load_tokenizer(cfg.model.tokenizer or model_src)
        with self.strategy.main_first():  # rank 0 fills the tokenization cache, the rest read it
            self.data = prepare_data(cfg, self.format, self.tokenizer, self.pm)
        self._log_data()
        self.model = self._load_model(model_src)
        self._check_lengths()
        self.model = self.strategy.wrap_model(self.model, self.amp_dtype)

        self.plan = BatchPlan(self.data.train.lengths, cfg.train.batch_size, cfg.data.max_seq_len,
                              cfg.data.packing, cfg.train.seed, shuffle=True,
                              world_size=self.strategy.world_size, rank=self.strategy.rank)
        self.val_plan = None
        if self.data.val is not None:
            self.val_plan = BatchPlan(self.data.val.lengths,
                                      cfg.eval.batch_size or cfg.train.batch_size,
                                      cfg.data.max_seq_len, cfg.data.packing, cfg.train.seed,
                                      shuffle=False, world_size=self.strategy.world_size,
                                      rank=self.strategy.rank)
        self.total_steps = self._count_steps()
        warm = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_ratio * self.total_steps))
        self.warmup_steps = min(warm, self.total_steps)
        self.optimizer = optimizers[cfg.optim.name].build(self._param_groups(), cfg.optim,
                                                          self.device)
        self.scheduler = schedulers[cfg.optim.scheduler].build(self.optimizer, self.total_steps,
                                                               self.warmup_steps, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        from .._ext import has_kernel

        self.loss_impl, why = resolve_impl(cfg.train.loss_impl, self.device, has_kernel)
        self.fallbacks = [] if why is None else [{"what": "loss", "asked": cfg.train.loss_impl,
                                                  "used": self.loss_impl, "reason": why}]
        if why is not None and self.is_main:
            log.warning("fallback: %s", why)
        self.loss_kernel = kernel_name(self.loss_impl, self.device)
        log.info("model %s on %s (%s), %d parameters; %d steps (%d warmup), loss: %s",
                 self.base_model, self.device, self.precision,
                 sum(p.numel() for p in self.unwrapped_model.parameters()), self.total_steps,
                 self.warmup_steps, self.loss_kernel)
        # reliability (resume.py, guards.py): periodic/preemption checkpoints, --resume, and the
        # non-finite guard (built after the restore: it reads the restored counters)
        from .checkpoint import Checkpointer

        faults = guards.parse_faults()
        if faults:
            log.warning("SFTCTL_FAULT is set (test fault injection): %s", faults)
        self.checkpointer = Checkpointer(self, faults=faults)
        self.checkpointer.restore()
        self.guard = guards.NonFiniteGuard(self, faults=faults)

    def _model_source(self) -> str:
        cfg = self.config
        src = cfg.model.name_or_path
        if src is None:
            if self.format.demo_base is None:
                raise ConfigError(f"model.name_or_path: format {self.format.name!r} (plugin "
                                  f"{self.format.plugin!r}) has no embedded demo model; pass "
                                  "--model PATH_OR_ID")
            base = self.out_dir / "base"
            if self.is_main:
                log.info("building the embedded base model of plugin %r in %s",
                         self.format.plugin, base)
                with ckpt.atomic_directory(base) as tmp:
                    self.format.demo_base(tmp, 0)
            self.strategy.barrier()
            self.base_model = str(base.resolve())
            return self.base_model
        p = Path(src).expanduser()
        if p.exists():
            if not (p / "config.json").is_file():
                raise ModelError(f"{p}: not a Hugging Face model directory (no config.json)")
            self.base_model = str(p.resolve())
            return self.base_model
        if src.startswith((".", "/", "~")) or src.count("/") > 1 or "\\" in src:
            raise ModelError(f"model path not found: {src}")
        self.base_model = src  # a hub id
        return src

    def _load_tokenizer(self, src: str):
        from transformers import AutoTokenizer

        cfg = self.config.model
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code,
                                                revision=cfg.revision)
        except Exception as e:
            raise ModelError(f"cannot load the tokenizer {src!r}: {type(e).__name__}: "
                             f"{str(e)[:400]}") from None
        if tok.eos_token_id is None:
            raise ModelError(f"tokenizer {src!r} has no eos_token; SFT appends EOS to every "
                             "response so the model learns to stop")
        if tok.pad_token_id is None:
            # Padding positions are masked by attention/loss masks, never by the pad id, so
            # reusing an existing special token is safe and avoids resizing the embeddings.
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
            log.warning("tokenizer has no pad token: using %r (padding is masked, never trained)",
                        tok.pad_token)
        tok.padding_side = "right"
        return tok

    def _load_model(self, src: str):
        from transformers import AutoModelForCausalLM

        cfg = self.config.model
        kw = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                  dtype=torch.float32)
        if cfg.attn_implementation:
            kw["attn_implementation"] = cfg.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kw)
        except Exception as e:
            raise ModelError(f"cannot load the model {src!r}: {type(e).__name__}: "
                             f"{str(e)[:400]}") from None
        emb = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > emb:
            raise ModelError(f"tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"embedding has {emb} rows")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None and \
                model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if cfg.gradient_checkpointing:
            # transformers 5 renamed it; non-reentrant checkpointing works with any input
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model = model.to(self.device)
        if cfg.compile:
            self.compiled = compile_blocks(model)
            if self.is_main:
                log.info("torch.compile: %s", self.compiled)
        return model

    compiled: str | None = None

    def _check_lengths(self) -> None:
        """A sequence longer than the model's positions would fail deep inside the model (learned
        positions) or silently degrade (RoPE): refuse it before training."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not limit:
            return
        longest = self.config.data.max_seq_len if self.config.data.packing else \
            int(max(self.data.train.lengths.max(),
                    self.data.val.lengths.max() if self.data.val is not None else 0))
        if longest > limit:
            what = "packed rows of --max-seq-len" if self.config.data.packing else \
                "the longest example"
            raise ConfigError(f"data.max_seq_len: {what} has {longest} tokens but the model "
                              f"supports {limit} positions (max_position_embeddings); lower "
                              f"--max-seq-len to {limit} or less")

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.unwrapped_model.named_parameters():
            if not p.requires_grad:
                continue
            # biases and norm weights (1-D) are not decayed
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.config.optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _count_steps(self) -> int:
        accum = self.config.train.grad_accum
        if self.config.train.max_steps is not None:
            return self.config.train.max_steps
        total = 0
        for epoch in range(self.config.train.epochs):
            total += math.ceil(self.plan.num_batches(epoch) / accum)
        if total == 0:
            raise ConfigError("no training steps: the training data gives no micro-batch")
        return total

    def _log_data(self) -> None:
        d = self.data
        for split in (d.train, d.val):
            if split is None:
                continue
            s = split.stats
            log.info("%s: %d examples used (%d truncated, %d dropped, %d skipped of %d records), "
                     "%d tokens, %d trainable", split.name, s.used, s.truncated, s.dropped,
                     s.skipped, s.records, s.tokens, s.trainable_tokens)
        if d.val is None:
            log.info("no validation set (use --val-data, --val-split or --val-fraction)")

    # ------------------------------------------------------------------------------- training

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _micro_batches(self, rows_list) -> list:
        pad = self.tokenizer.pad_token_id
        return [collate(self.data.train, rows, pad_id=pad, packing=self.config.data.packing)
                .to(self.device) for rows in rows_list]

    def train_step(self, rows_list) -> dict:
        """One optimizer step over the micro-batches ``rows_list``; returns step metrics."""
        cfg = self.config
        impl = self.loss_impl
        t0 = time.perf_counter()
        micro = self._micro_batches(rows_list)
        labels, count = [], torch.zeros((), dtype=torch.long, device=self.device)
        for mb in micro:
            lab, n = sft_labels(mb, impl)
            labels.append(lab)
            count = count + n
        normalizer = self.strategy.all_reduce_sum(count).to(torch.float32)  # global, 0-dim
        self.model.train()
        scaling = self.scaler.is_enabled()
        grad_scale = self.scaler.scale(torch.ones((), device=self.device)) if scaling else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        factor = self.strategy.loss_factor
        for i, (mb, lab) in enumerate(zip(micro, labels)):
            with self.strategy.grad_sync(self.model, enabled=i == len(micro) - 1):
                with self.autocast():
                    logits = self.model(**mb.model_inputs()).logits  # [B, T, V]
                loss = token_loss(logits, lab, normalizer, impl,
                                  grad_scale=grad_scale if impl == "fused" else None,
                                  consume_logits=True)
                scaled = loss * factor if factor != 1.0 else loss
                (self.scaler.scale(scaled) if scaling else scaled).backward()
            loss_sum += loss.detach()
            del logits, loss, scaled
        if scaling:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = self.strategy.clip_grad_norm_(params, clip)  # global over ranks
        lr = self.optimizer.param_groups[0]["lr"]
        log_now = (self.state.step + 1) % cfg.train.log_every == 0 or \
            self.state.step + 1 == self.total_steps
        metrics = None
        tokens = sum(mb.num_tokens for mb in micro)  # this rank's
        if log_now:
            step_tokens, tokens_total = tokens, self.state.tokens_total + tokens
            if self.strategy.world_size > 1:  # each rank holds its share of the step's loss
                sums = self.strategy.all_reduce_sum(torch.tensor(
                    [float(loss_sum), tokens, tokens_total], dtype=torch.float64,
                    device=self.device))  # [3]
                loss_sum, step_tokens, tokens_total = sums[0], int(sums[1]), int(sums[2])
        # non-finite guard (guards.py): raises (stop) or returns False (skip) before the update;
        # on CUDA it reads its flag only where the loss is read anyway (log_now)
        apply = self.guard.check(loss_sum, grad_norm, self.state.step + 1, sync=log_now)
        if log_now:
            loss_v, gn_v = float(loss_sum), float(grad_norm)
            metrics = {"loss": loss_v, "grad_norm": gn_v, "trainable": int(normalizer),
                       "step_tokens": step_tokens, "tokens_all_ranks": tokens_total}
            if self.guard.skipped_now:
                metrics["skipped_nonfinite"] = True
        if not apply:
            if scaling:
                self.scaler.update()  # its inf check ran in unscale_; the scale backs off
        elif scaling:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            with self.guard.masked_update(self.optimizer):
                self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda" and log_now:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        out = {"tokens": tokens, "examples": sum(mb.num_examples for mb in micro), "time": dt,
               "lr": lr}
        if metrics:
            out.update(metrics)
        return out

    def train(self) -> dict:
        """Run to ``total_steps``, validate, save the final model; return the summary."""
        cfg = self.config
        st = self.state
        accum = cfg.train.grad_accum
        from tqdm.auto import tqdm

        self.pm.hook.sftctl_train_start(trainer=self)
        if self.val_plan is not None and cfg.eval.initial and st.step == 0:
            self.evaluate()
        bar = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step",
                   disable=cfg.train.quiet or not self.is_main, dynamic_ncols=True,
                   file=sys.stderr)
        epoch_batches = None
        epoch_of_batches = -1
        while st.step < self.total_steps:
            if epoch_of_batches != st.epoch:
                epoch_batches = self.plan.batches(st.epoch)
                epoch_of_batches = st.epoch
            if st.micro_in_epoch >= len(epoch_batches):
                st.epoch += 1
                st.micro_in_epoch = 0
                continue
            group = epoch_batches[st.micro_in_epoch: st.micro_in_epoch + accum]
            m = self.train_step(group)
            st.step += 1
            st.micro_in_epoch += len(group)
            st.tokens_total += m["tokens"]
            st.examples_total += m["examples"]
            st.train_time_s += m["time"]
            if "loss" in m:
                st.trainable_total += m["trainable"]
                metrics = {"kind": "train", "step": st.step,
                           "epoch": round(st.epoch + st.micro_in_epoch / len(epoch_batches), 4),
                           "loss": m["loss"], "lr": m["lr"], "tokens": m["step_tokens"],
                           "trainable_tokens": m["trainable"],
                           "tokens_total": m["tokens_all_ranks"],
                           "tokens_per_s": m["step_tokens"] / max(m["time"], 1e-9),
                           "grad_norm": m["grad_norm"], "time": round(time.time() - self._t0, 3)}
                if m.get("skipped_nonfinite"):
                    metrics["skipped_nonfinite"] = True
                st.history.append(metrics)
                self.pm.hook.sftctl_step_end(trainer=self, step=st.step, metrics=metrics)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if self.val_plan is not None and cfg.eval.every and st.step % cfg.eval.every == 0 \
                    and st.step < self.total_steps:
                self.evaluate()
            self.checkpointer.step_end()  # periodic save; preemption: save and raise
            if self.stop_reason is not None:
                log.info("stopping at step %d: %s", st.step, self.stop_reason)
                break
        bar.close()
        if self.val_plan is not None and not (st.history and st.history[-1]["kind"] == "val"
                                              and st.history[-1]["step"] == st.step):
            self.evaluate()
        return self.finish()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (token mean over the whole validation set) and perplexity."""
        impl = self.loss_impl
        self.model.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        pad = self.tokenizer.pad_token_id
        t0 = time.perf_counter()
        for rows in self.val_plan.batches(0):
            mb = collate(self.data.val, rows, pad_id=pad, packing=self.config.data.packing)
            mb = mb.to(self.device)
            lab, n = sft_labels(mb, impl)
            with self.autocast():
                logits = self.model(**mb.model_inputs()).logits  # [B, T, V]
            total += token_loss(logits, lab, None, impl, reduction="sum").float()
            count += n
        total = self.strategy.all_reduce_sum(total)
        count = self.strategy.all_reduce_sum(count)
        n = int(count)
        val_loss = float(total) / max(n, 1)
        metrics = {"kind": "val", "step": self.state.step, "val_loss": val_loss,
                   "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": n,
                   "time": round(time.time() - self._t0, 3),
                   "eval_time_s": round(time.perf_counter() - t0, 3)}
        self.pm.hook.sftctl_evaluate(trainer=self, step=self.state.step, metrics=metrics)
        self.state.history.append(metrics)
        if self.is_main:
            log.info("step %d: val_loss %.4f, val_ppl %.3f", self.state.step, val_loss,
                     metrics["val_ppl"])
        return metrics

    # --------------------------------------------------------------------------- resumability

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly: model, optimizer, scheduler, grad
        scaler, every RNG and the counters/history. Tensors and plain types only, so it
        round-trips through ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "state": self.state.state_dict(),
            "world_size": self.strategy.world_size,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict`` into a trainer that ran ``setup()`` with the same config."""
        if sd.get("world_size", 1) != self.strategy.world_size:
            raise TrainingError(f"the state was saved with world size {sd.get('world_size')}, "
                                f"this run has {self.strategy.world_size}")
        if self.strategy.sharded_state:  # whole tensors do not load into FSDP's sharded ones
            raise TrainingError("the state was saved whole (by --strategy ddp or none); resume "
                                "it with that strategy, not --strategy fsdp")
        self.unwrapped_model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        self.state = TrainState()
        self.state.load_state_dict(sd["state"])
        ckpt.set_rng_state(sd["rng"])

    # -------------------------------------------------------------------------------- finish

    def summary(self) -> dict:
        st = self.state
        d = self.data
        mem, mem_kind = peak_memory(self.device)
        train_hist = [h for h in st.history if h["kind"] == "train"]
        val_hist = [h for h in st.history if h["kind"] == "val"]
        cfg = self.config
        return {
            "status": "complete",
            "model": cfg.model.name_or_path or EMBEDDED_MODEL,
            "base_model": self.base_model,
            "data": {"format": d.format, "format_plugin": self.format.plugin,
                     "train": d.sources, "validation": d.val_sources,
                     "packing": cfg.data.packing, "max_seq_len": cfg.data.max_seq_len},
            "examples": {k: getattr(d.train.stats, k) for k in
                         ("used", "truncated", "dropped", "skipped")},
            "examples_detail": {"train": d.train.stats.to_json(),
                                "validation": d.val.stats.to_json() if d.val else None},
            "steps": st.step,
            "epochs": round(st.epoch + (st.micro_in_epoch / max(self.plan.num_batches(st.epoch),
                                                                1)), 4),
            "tokens": getattr(self, "_tokens_all_ranks", st.tokens_total),
            "trainable_tokens": st.trainable_total,
            "wall_time_s": round(time.time() - self._t0, 3),
            "train_time_s": round(st.train_time_s, 3),
            "tokens_per_s": getattr(self, "_tokens_all_ranks", st.tokens_total) /
            max(st.train_time_s, 1e-9),
            "peak_memory_bytes": mem,
            "peak_memory_kind": mem_kind,
            "loss_kernel": self.loss_kernel,
            "loss_impl": self.loss_impl,
            "fallbacks": self.fallbacks,
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else ""),
            "precision": self.precision,
            "compiled": self.compiled,
            "cpu_threads": cpu_threads_info(),
            "world_size": self.strategy.world_size,
            "strategy": self.strategy.name,
            "final_loss": train_hist[-1]["loss"] if train_hist else None,
            "initial_val_loss": val_hist[0]["val_loss"] if val_hist and val_hist[0]["step"] == 0
            else None,
            "val_loss": val_hist[-1]["val_loss"] if val_hist else None,
            "val_ppl": val_hist[-1]["val_ppl"] if val_hist else None,
            "stopped_early": self.stop_reason,
            "nonfinite_skipped": st.nonfinite_skipped,
            "resumed_from": self.extras.get("resumed_from"),
            "plugins": list(cfg.plugins),
            "versions": versions(),
            "benchmarks": self.benchmarks,
        }

    def finish(self) -> dict:
        """Save the final model atomically, then summary.json; return the summary."""
        if self.strategy.world_size > 1:  # exact input-token count over all ranks
            self._tokens_all_ranks = int(self.strategy.all_reduce_sum(torch.tensor(
                self.state.tokens_total, dtype=torch.long, device=self.device)))
        self.guard.sync(self.state.step)  # never save past an unread non-finite step
        summary = self.summary()
        model = self.unwrapped_model
        model.config.use_cache = True
        full = self.strategy.full_state_dict(self.model)  # every rank: FSDP gathers the shards
        if self.is_main:
            with self.checkpointer.wrap_disk_errors(f"the final model {self.out_dir / 'model'}"), \
                    ckpt.atomic_directory(self.out_dir / "model") as tmp:
                ckpt.save_hf_model(model, self.tokenizer, tmp, config_yaml=ckpt.config_yaml(self.config),
                                   summary=summary, state_dict=full)
                self.pm.hook.sftctl_save(trainer=self, path=tmp)
        self.strategy.barrier()
        self.pm.hook.sftctl_after_train(trainer=self, summary=summary)
        if self.is_main:
            ckpt.write_json(self.out_dir / "summary.json", summary)
        return summary
