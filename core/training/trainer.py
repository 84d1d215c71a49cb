"""The SFT trainer: it wires the parts (data, model, optimizer, loss, guard, checkpointer), runs
the loop and saves the final model.

Design choices
- The trainer only wires parts built elsewhere: model and tokenizer loading (``model.py``), data
  (``sftctl.data.prepare_data``), the loss (``loss.py``), the non-finite guard (``guards.py``),
  checkpoints and resume (``checkpoint.py``), distribution (``distributed.py``). Each part gets
  what it needs, never the trainer.
- Everything a resumable checkpoint needs is one bundle, ``RunState`` (``state.py``): model,
  optimizer, scheduler, grad scaler and the counters (``TrainState``), with every RNG captured
  on save. The data order is a pure function of (seed, epoch), so restoring the bundle continues
  the exact same run; the checkpointer saves and restores it in one place.
- ``setup`` does all the checking and loading (registrations, model path, tokenizer, data,
  optimizer) before any step, so bad input never leaves a trained-looking directory.
- One optimizer step = ``grad_accum`` micro-batches and reads as labels -> forward and loss ->
  backward -> update. The labels of all micro-batches are built first and their trainable
  targets summed (over ranks too) into a device tensor; each micro-batch's loss is
  ``sum / that count``, so the accumulated gradient is exactly that of the token-mean loss of
  the whole step, with no host sync.
- The loss comes from the hidden states and the output layer's weight in one op wherever the
  model allows it (``head.py``: computed inside the model's forward, so DDP/FSDP2 work as
  usual), else from the logits; packed (and, on CUDA, padded) rows run attention per document
  through ``attention.py``'s varlen function. Each choice, and each fallback with its reason,
  is logged and written to summary.json (``loss_head``, ``attention``, ``fallbacks``).
- On CUDA a step never waits for the device: batches are pinned and copied asynchronously, and
  a logged step's loss, gradient norm, counts and guard flags travel as one small vector read
  after the next step is queued (``readback.py``; ``--async-metrics``).
- Mixed precision: master weights and optimizer state stay fp32; the forward runs under autocast
  (bf16/fp16). With bf16 on CUDA the Linear weights hold their fp32 masters split in two 16-bit
  halves (``master_weights.py``: bf16 weights and gradients, the same updates). fp16 uses a
  GradScaler whose scale is handed to the fused loss as ``grad_scale`` so the scaled backward
  costs no extra pass over the logits gradient.
- Distribution goes through ``Strategy`` (``distributed.py``): the model is wrapped by it, the
  batch plan shards rows by rank, and only rank 0 logs, shows progress and writes files.
- Plugins see the run through ``RunContext`` (``context.py``): read-only views plus
  ``request_stop`` and ``extras``, never the trainer itself. Metrics go through the
  ``sftctl_step_end`` / ``sftctl_evaluate`` hooks (the JSONL writer is a built-in plugin) and
  into the counters' history.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from .. import OMP_WAIT_POLICY_REASON
from .._runtime import cpu_threads_info
from ..data import BatchPlan, PreparedData, collate, prepare_data
from ..errors import ConfigError, TrainingError
from . import allocator, atomic, attention, guards, master_weights
from .checkpoint import Checkpointer, data_fingerprint
from .context import RunContext
from .distributed import Strategy, select_strategy
from .head import FusedHead, HeadRequest, posted, target_rows
from .loss import kernel_name, resolve_impl, sft_labels, token_loss, torch_sft_labels
from .model import (autocast_dtype, check_lengths, compile_blocks, has_blocks, load_model,
                    load_tokenizer, model_source, resolve_compile)
from .optim import clip_divisor, param_groups
from .readback import DeviceRead, start_event
from .state import RunState, TrainState, seed_everything
from .trackers import check_report_to

log = logging.getLogger("sftctl")

EMBEDDED_MODEL = "embedded:tiny_llama"
# the fused head's fp32 logits chunk (--fused-head-chunk-rows 0): half the op's own 1 GiB
# default, since the trainer's chunk is live at the end of the forward, at the peak of memory


def _short(value) -> str:
    """A value for a log line: its repr when short, else its type (a quantization config)."""
    r = repr(value)
    return r if len(r) <= 40 and "\n" not in r else type(value).__name__


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


def parameter_counts(model: torch.nn.Module) -> dict:
    """Parameters of the model as it trains (shared ones once): total and trainable."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def prepare_run_data(config, fmt, tokenizer, pm=None) -> PreparedData:
    """``sftctl.data.prepare_data`` wired to a run: its data config, plugin options, seed, the
    ``sftctl_load_dataset`` hook and the format's demo data."""
    def from_plugins(spec):
        return pm.hook.sftctl_load_dataset(source=spec, config=config)

    loader = from_plugins if pm is not None else None
    demo = (lambda: fmt.demo_data(config)) if fmt.demo_data is not None else None
    return prepare_data(config.data, fmt, tokenizer, seed=config.train.seed,
                        options=config.options, quiet=config.train.quiet,
                        plugin_loader=loader, demo_data=demo,
                        heldout_size=benchmark_holdout(config))


def benchmark_holdout(config) -> int | None | bool:
    """What ``prepare_data`` holds out of ``--data`` for the benchmark of the user's data
    (``False``: nothing, because evaluation is off, no ``--data`` is given, or the held-out
    records come from ``--heldout``, ``--val-data`` or ``--val-split``)."""
    dc, ec = config.data, config.eval
    if not ec.enabled or not dc.paths or ec.heldout or dc.val_paths or dc.val_split:
        return False
    return ec.heldout_size


def heldout_record(config, data: PreparedData) -> dict | None:
    """summary.json's ``heldout``: where the records of the user-data benchmark come from."""
    dc, ec = config.data, config.eval
    if not ec.enabled or not dc.paths:
        return None
    if ec.heldout:
        return {"source": f"--heldout {ec.heldout}", "paths": [ec.heldout], "split": dc.split}
    if dc.val_paths:
        return {"source": "--val-data " + " ".join(dc.val_paths), "paths": list(dc.val_paths),
                "split": dc.split}
    if dc.val_split:
        return {"source": f"split {dc.val_split!r} of --data", "paths": list(dc.paths),
                "split": dc.val_split}
    if not data.heldout:
        return None
    return {"source": f"{len(data.heldout)} records of --data held out of training (seed "
                      f"{config.train.seed})", "paths": ["heldout.jsonl"], "split": "train",
            "records": len(data.heldout)}


# summary.json's rule for non-finite numbers: null + a ``<key>_nonfinite`` flag
_strict_json = atomic.strict_json


def _final_loss(train_hist: list[dict]) -> dict:
    """summary.json's ``final_loss`` (the last finite logged training loss), ``final_loss_step``
    (its step) and ``final_loss_reason`` (null, or why the loss is not the last logged step's:
    a pipeline comparing runs gets a number it can use and is told when it is an older one)."""
    finite = [h for h in train_hist if isinstance(h.get("loss"), (int, float))
              and math.isfinite(h["loss"])]
    last = finite[-1] if finite else None
    later = [h["step"] for h in train_hist if last is None or h["step"] > last["step"]]
    reason = None
    if not train_hist:
        reason = "no training step was logged"
    elif last is None:
        reason = (f"no finite training loss: all {len(later)} logged step(s) had a non-finite "
                  "loss (skipped by the non-finite guard)")
    elif later:
        shown = ", ".join(map(str, later[:10])) + (" ..." if len(later) > 10 else "")
        reason = (f"the last {len(later)} logged step(s) ({shown}) had a non-finite loss "
                  f"(skipped by the non-finite guard); final_loss is step {last['step']}'s")
    return {"final_loss": last["loss"] if last else None,
            "final_loss_step": last["step"] if last else None,
            "final_loss_reason": reason}


class Trainer:
    """Build with a validated run config and a loaded plugin manager; ``setup()``, ``train()``.

    ``benchmarks``: what summary.json records for the post-training evaluation (dicts).
    """

    def __init__(self, config, pm, strategy: Strategy | None = None, *,
                 benchmarks: list[dict] | None = None):
        self.config = config
        self.pm = pm
        self.strategy = strategy or select_strategy(config)
        self.out_dir = Path(config.train.output_dir)
        self.benchmarks = list(benchmarks or [])
        self.heldout: dict | None = None
        self.state = TrainState()                # the counters (part of ``run_state``)
        self.run_state: RunState | None = None   # built by setup()
        self.stop_reason: str | None = None      # set through RunContext.request_stop
        self.resumed_from: str | None = None
        self.compiled: str | None = None
        self.extras: dict = {}                   # per-run storage of plugins (RunContext.extras)
        self.context = RunContext(self)
        # built by setup(), in this order (None until then)
        self.format = self.optimizer_spec = self.scheduler_spec = None  # the plugins' parts
        self.device: torch.device | None = None
        self.precision, self.amp_dtype = None, None
        self.base_model: str | None = None
        self.tokenizer = self.data = self.model = None
        self.plan = self.val_plan = None
        self.total_steps = self.warmup_steps = 0
        self.optimizer = self.scheduler = self.scaler = None
        self.loss_impl = self.loss_kernel = None
        self.fallbacks: list[dict] = []
        self.head: FusedHead | None = None       # the fused output layer (None: logits + CE)
        self.cuda_allocator: dict = {}  # the allocator mode (--cuda-allocator) and why
        self.head_chunk_rows: int | None = None  # rows per fused-head chunk (--fused-head-chunk-rows)
        self.head_info: dict = {}                # summary.json "loss_head"
        self.attention: attention.AttentionChoice | None = None  # packed-attention path
        self.master = master_weights.MasterWeightsChoice("fp32", "not set up")
        # step metrics are read one step late on CUDA (see train_step); set by _runtime
        self.deferred_reads = False
        self._pending: tuple | None = None
        self.tokens_added = 0
        self.parameters: dict = {}               # total / trainable, after sftctl_prepare_model
        self.checkpointer: Checkpointer | None = None
        self.guard: guards.NonFiniteGuard | None = None
        self._t0 = time.time()
        # historic: plugins registered later still see it; a plugin may reject the config here
        pm.hook.sftctl_configure.call_historic(kwargs=dict(config=config, pm=pm))

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    @property
    def unwrapped_model(self):
        return self.strategy.unwrap(self.model)

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Check and build everything, in this order: plugin parts, runtime, tokenizer and
        data, model, batch plans, optimization, loss, reliability (guard, checkpoints, resume)."""
        self._plugin_parts()
        self._runtime()
        src, self.base_model = model_source(self.config.model.name_or_path, self.format,
                                            self.out_dir, self.strategy)
        self.tokenizer = load_tokenizer(self.config.model.tokenizer or src, self.config.model)
        vocab = len(self.tokenizer)
        self.pm.hook.sftctl_prepare_tokenizer(tokenizer=self.tokenizer, config=self.config)
        self.tokens_added = len(self.tokenizer) - vocab  # by plugins (e.g. chat template markers)
        with self.strategy.main_first():  # rank 0 fills the tokenization cache, the rest read it
            self.data = prepare_run_data(self.config, self.format, self.tokenizer, self.pm)
        self._log_data()
        self.heldout = heldout_record(self.config, self.data)
        if self.is_main and self.data.heldout:
            from .atomic import write_text

            self.out_dir.mkdir(parents=True, exist_ok=True)  # API users: the CLI makes it first
            write_text(self.out_dir / "heldout.jsonl", "".join(
                json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in self.data.heldout))
        self._loss()  # which loss runs decides whether the fused head is tried
        self.model = self._build_model(src)
        self._plans()
        self._optimization()
        self._reliability()
        log.info("model %s on %s (%s), %d parameters (%d trainable); %d steps (%d warmup), "
                 "loss: %s", self.base_model, self.device, self.precision,
                 self.parameters["total"], self.parameters["trainable"], self.total_steps,
                 self.warmup_steps, self.loss_kernel)
        if self.warmup_steps > self.total_steps:
            log.warning("optim: %d warmup steps but the run has %d steps: the learning rate "
                        "never reaches optim.lr (lower --warmup-steps/--warmup-ratio or train "
                        "longer)", self.warmup_steps, self.total_steps)

    def _plugin_parts(self) -> None:
        """The dataset format, optimizer and scheduler the config names, and the fused op."""
        cfg = self.config
        formats = self.pm.dataset_formats()
        if cfg.data.format is None:  # the CLI resolves it; API users get the default format
            cfg.data.format = "alpaca"
        if cfg.data.format not in formats:
            raise ConfigError(f"data.format: unknown dataset format {cfg.data.format!r}; "
                              f"registered: {', '.join(sorted(formats))}")
        self.format = formats[cfg.data.format]
        optimizers, schedulers = self.pm.optimizers(), self.pm.schedulers()
        if cfg.optim.name not in optimizers:
            raise ConfigError(f"optim.name: unknown optimizer {cfg.optim.name!r}; registered: "
                              f"{', '.join(sorted(optimizers))}")
        if cfg.optim.scheduler not in schedulers:
            raise ConfigError(f"optim.scheduler: unknown scheduler {cfg.optim.scheduler!r}; "
                              f"registered: {', '.join(sorted(schedulers))}")
        self.optimizer_spec = optimizers[cfg.optim.name]
        self.scheduler_spec = schedulers[cfg.optim.scheduler]
        # --report-to: known trackers whose packages are installed (before data and model load)
        check_report_to(cfg, self.pm.trackers())
        if cfg.train.loss_impl == "fused":
            try:
                from .. import ops  # noqa: F401
            except Exception as e:
                raise ConfigError(f"--loss-impl fused needs the compiled extension sftctl._C, "
                                  f"which failed to load ({type(e).__name__}: {e}); rebuild it "
                                  "(pip install --no-build-isolation -e .) or pass --loss-impl "
                                  "torch") from None

    def _runtime(self) -> None:
        """Threads, device, precision, seed."""
        cfg = self.config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if OMP_WAIT_POLICY_REASON and self.is_main:
            log.info("OMP_WAIT_POLICY=PASSIVE: %s (set OMP_WAIT_POLICY to choose yourself)",
                     OMP_WAIT_POLICY_REASON)
        self.device = self.strategy.device(cfg.train.device)
        self.cuda_allocator = allocator.configure(cfg.train.cuda_allocator, self.device)
        if self.is_main and self.device.type == "cuda":
            log.info("cuda allocator: %s (%s)", self.cuda_allocator["mode"],
                     self.cuda_allocator["reason"])
        self.precision, self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        am = cfg.train.async_metrics
        self.deferred_reads = am == "on" or (am == "auto" and self.device.type == "cuda")
        seed_everything(cfg.train.seed)

    def _build_model(self, src: str):
        cfg = self.config
        load_options, owners = self.pm.model_load_options(cfg, self.device)
        if load_options and self.is_main:
            log.info("model load options from plugins: %s", ", ".join(
                f"{k}={_short(load_options[k])} (plugin {owners[k]!r})"
                for k in sorted(load_options)))
        model = load_model(src, cfg.model, self.tokenizer, self.device,
                           resize_embeddings=self.tokens_added > 0, load_options=load_options)
        # plugins wrap or replace it (adapters, freezing) before compile, DDP/FSDP and resume
        model = self.pm.call_chain("sftctl_prepare_model", "model", model=model, config=cfg)
        self.parameters = parameter_counts(model)
        compile_on = resolve_compile(cfg.model.compile, self.device, model)
        if cfg.model.compile == "auto" and self.device.type == "cuda" and self.is_main:
            log.info("torch.compile (--compile auto): %s", "on" if compile_on else
                     "off (a quantized base, or a model a plugin wrapped in something "
                     "other than peft; --compile turns it on)")
        # probes run the plain model, before torch.compile and DDP/FSDP
        self._output_layer(model, whole_model_compiled=compile_on and not has_blocks(model))
        self._packed_attention(model)
        self._master_weights(model)  # before compile: the graphs see the bf16 weights
        if compile_on:
            self.compiled = compile_blocks(model)
            if self.is_main:
                log.info("torch.compile: %s", self.compiled)
        if cfg.data.packing:
            check_lengths(model.config, cfg.data.max_seq_len, "packed rows of --max-seq-len")
        else:
            longest = max(self.data.train.lengths.max(),
                          self.data.val.lengths.max() if self.data.val is not None else 0)
            check_lengths(model.config, int(longest), "the longest example")
        return self.strategy.wrap_model(model, self.amp_dtype)

    def _plans(self) -> None:
        cfg, st = self.config, self.strategy
        self.plan = BatchPlan(self.data.train.lengths, cfg.train.batch_size, cfg.data.max_seq_len,
                              cfg.data.packing, cfg.train.seed, shuffle=True,
                              world_size=st.world_size, rank=st.rank)
        self.val_plan = None
        if self.data.val is not None:
            self.val_plan = BatchPlan(self.data.val.lengths,
                                      cfg.eval.batch_size or cfg.train.batch_size,
                                      cfg.data.max_seq_len, cfg.data.packing, cfg.train.seed,
                                      shuffle=False, world_size=st.world_size, rank=st.rank)
        self.total_steps = self._count_steps()

    def _optimization(self) -> None:
        """Optimizer, LR scheduler (with warmup) and grad scaler (fp16 only)."""
        cfg = self.config
        warm = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_ratio * self.total_steps))
        self.warmup_steps = min(warm, self.total_steps)
        groups = param_groups(self.unwrapped_model.named_parameters(), cfg.optim.weight_decay)
        if self.master.mode == "split":
            self.optimizer = self.optimizer_spec.create_split(groups, cfg.optim, self.device,
                                                              self._split_lows, cfg.options)
            del self._split_lows  # the optimizer state holds them now
        else:
            self.optimizer = self.optimizer_spec.create(groups, cfg.optim, self.device,
                                                        cfg.options)
        self.scheduler = self.scheduler_spec.create(self.optimizer, self.total_steps,
                                                    self.warmup_steps, cfg.optim, cfg.options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def _loss(self) -> None:
        """Which loss implementation runs; a fallback from the fused kernel is counted."""
        from .._ext import has_kernel

        asked = self.config.train.loss_impl
        self.loss_impl, why = resolve_impl(asked, self.device, has_kernel)
        self.fallbacks = []
        if why is not None:
            self._fallback("loss", asked, self.loss_impl, why)
        self.loss_kernel = kernel_name(self.loss_impl, self.device)

    def _fallback(self, what: str, asked: str, used: str, reason: str) -> None:
        """Count a fallback (summary.json ``fallbacks``) and say it (repeated at the end)."""
        self.fallbacks.append({"what": what, "asked": asked, "used": used, "reason": reason})
        if self.is_main:
            log.warning("fallback: %s (%s; using %s)", reason, what, used)

    def _output_layer(self, model, whole_model_compiled: bool) -> None:
        """The fused linear + cross-entropy head when the loss is sftctl's and the model's output
        layer allows it (``head.py``); else logits + cross-entropy, a counted fallback under
        ``--fused-head auto``, an error under ``on``."""
        asked = self.config.train.fused_head
        plain = "logits + cross_entropy"
        if self.loss_impl != "fused" or asked == "off":
            why = ("--fused-head off" if asked == "off" else
                   f"--loss-impl {self.loss_impl} (the fused head is sftctl's op)")
            if asked == "on":
                raise ConfigError(f"train.fused_head: on needs --loss-impl fused ({why})")
            self.head_info = {"fused": False, "path": plain, "reason": why}
            return
        self.head, why = FusedHead.plan(model, whole_model_compiled=whole_model_compiled)
        if self.head is None:
            if asked == "on":
                raise ConfigError(f"train.fused_head: on, but the fused head cannot be used: "
                                  f"{why} (use --fused-head auto or off)")
            self.head_info = {"fused": False, "path": plain, "reason": why}
            self._fallback("fused_head", asked, plain, why)
        else:
            self.head_chunk_rows = self.config.train.fused_head_chunk_rows or None
            route = self._embedding_grad_route(model)  # before describe(): it names the route
            self.head_info = {"fused": True, "path": self.head.describe(), "reason": None,
                              "tied": self.head.tied, "embedding_grad": route,
                              "chunk_rows": self.head_chunk_rows or self._op_chunk_rows(),
                              "chunk_rows_at": self._micro_batch_rows(),
                              **self.head.transform}
            if self.is_main:
                log.info("loss head: %s", self.head.describe())
        self.loss_kernel = kernel_name(self.loss_impl, self.device, fused_head=self.head is not None)

    def _embedding_grad_route(self, model) -> str | None:
        """A tied fused head's embedding gradient: added into the head's gradient in place where
        that is safe (``FusedHead.route_embedding_grad``), else autograd's; summary.json says
        which and why (None: the head is not tied)."""
        w = self.head.head.weight
        if not self.head.tied:
            return None
        if not w.requires_grad:
            return "none: the tied weight is frozen"
        if self.strategy.name != "none":  # DDP/FSDP hooks fire when the head's gradient lands
            return (f"autograd's dense gradient: strategy {self.strategy.name} (its gradient "
                    "hooks need the whole gradient from autograd)")
        why = self.head.route_embedding_grad(model)
        return "into the head's gradient" if why is None else f"autograd's dense gradient: {why}"

    def _micro_batch_rows(self) -> int:
        """The most token rows one micro-batch can have (batch size x max sequence length)."""
        return self.config.train.batch_size * self.config.data.max_seq_len

    def _op_chunk_rows(self) -> int:
        """The fused head op's default rows per chunk for a full micro-batch in which every row
        has a target (fewer target rows may fit one chunk where these do not): see
        ``op_chunk_rows``."""
        from ..ops.linear_ce_ref import op_chunk_rows

        w = self.head.head.weight
        gemm = self.amp_dtype if self.amp_dtype is not None else w.dtype
        item = gemm.itemsize
        if self.device.type == "cpu" and item < 4:
            item += 4  # the CPU's GEMMs take an fp32 copy of the 16-bit gradient
        spared = w.numel() * 4 if w.requires_grad and w.dtype != torch.float32 else 0
        return op_chunk_rows(w.shape[0], self._micro_batch_rows(), gemm_bytes=item,
                             spared_bytes=spared)

    def _master_weights(self, model) -> None:
        """Split fp32 master weights of the Linear layers or keep them (``master_weights.py``)."""
        from transformers import PreTrainedModel

        cfg = self.config
        out_w = None
        if self.head is not None:
            out_w = self.head.head.weight
        elif model.get_output_embeddings() is not None:
            out_w = model.get_output_embeddings().weight
        candidates = master_weights.eligible_weights(model, out_w)
        try:
            self.master = master_weights.choose(
                cfg.train.master_weights, device=self.device, amp_dtype=self.amp_dtype,
                world_size=self.strategy.world_size, grad_accum=cfg.train.grad_accum,
                optimizer_name=cfg.optim.name,
                optimizer_splits=self.optimizer_spec.split_build is not None,
                adapters=not isinstance(model, PreTrainedModel), candidates=candidates)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._split_lows = {}
        if self.master.mode == "split":
            self._split_lows = master_weights.split_parameters([p for _n, p in candidates])
        if self.is_main and (self.master.mode == "split" or self.device.type == "cuda"):
            log.info("master weights: %s", self.master.describe())

    def _packed_attention(self, model) -> None:
        """Varlen attention for packed rows where it applies (``attention.py``)."""
        cfg = self.config
        with self.autocast():
            self.attention = attention.choose(model, cfg.model, cfg.data.packing, self.device,
                                              self.amp_dtype)
        a = self.attention
        if a.fallback:
            self._fallback("packed_attention", f"{cfg.model.packed_attention} (varlen on "
                           f"{self.device.type})", a.describe(), a.reason)
        elif (cfg.data.packing or a.varlen) and self.is_main:
            log.info("%s: %s%s", "packed attention" if cfg.data.packing else "attention",
                     a.describe(), "" if a.varlen else f" ({a.reason})")

    def _reliability(self) -> None:
        """The saveable bundle, the non-finite guard, the checkpointer; then ``--resume``."""
        cfg = self.config
        self.run_state = RunState(self.model, self.optimizer, self.scheduler, self.scaler,
                                  self.state, unwrap=self.strategy.unwrap)
        faults = guards.parse_faults()
        if faults:
            log.warning("SFTCTL_FAULT is set (test fault injection): %s", faults)
            if "nan_at_step" in faults:
                guards.install_nan_fault(faults, self.unwrapped_model, self.state)
        self.checkpointer = Checkpointer(
            self.out_dir, self.run_state, self.strategy, save_every=cfg.train.save_every,
            keep_last=cfg.train.keep_last, total_steps=self.total_steps,
            config=cfg.to_dict(), config_yaml=atomic.config_yaml(cfg),
            data_fingerprint=data_fingerprint(self.data.train), device=self.device,
            faults=faults)
        # the split step checks the weights it writes (one read less of most of the model)
        checked_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        written_flag = None
        if hasattr(self.optimizer, "flag_nonfinite_writes"):
            written_flag = torch.zeros(1, dtype=torch.float32, device=self.device)
            covered = {id(p) for p in self.optimizer.flag_nonfinite_writes(written_flag)}
            checked_params = [p for p in checked_params if id(p) not in covered]
        self.guard = guards.NonFiniteGuard(
            policy=cfg.train.on_nonfinite, limit=cfg.train.max_nonfinite_in_a_row,
            counters=self.state, optimizer=self.optimizer, scaling=self.scaler.is_enabled(),
            device=self.device, all_reduce_sum=self.strategy.all_reduce_sum,
            world_size=self.strategy.world_size,
            last_checkpoint=self.checkpointer.last_complete,
            params=checked_params, written_flag=written_flag)
        # clipping folded into the fused step (``_unscale_and_clip``): gradients whole on
        # every rank (no FSDP shards), and an optimizer that takes a device grad_scale
        # (split master weights: always, so no bf16 gradient is multiplied in bf16)
        self.fold_clip = self.master.mode == "split" or (
            self.guard.mode == "device" and not self.scaler.is_enabled()
            and self.strategy.name in ("none", "ddp")
            and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)))
        self._grad_divisor = None
        self.checkpointer.before_save = self.guard.sync
        self.checkpointer.after_save = lambda step, path: self.pm.hook.sftctl_checkpoint_saved(
            run=self.context, step=step, path=path)
        resumed = self.checkpointer.restore(cfg.train.resume)
        if resumed is not None:
            self.resumed_from = str(resumed)
        self.guard.reset_from_counters()  # a restore changed the in-a-row count it starts from

    def _count_steps(self) -> int:
        accum = self.config.train.grad_accum
        if self.config.train.max_steps is not None:
            return self.config.train.max_steps
        total = sum(math.ceil(self.plan.num_batches(epoch) / accum)
                    for epoch in range(self.config.train.epochs))
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

    def _micro_batches(self, rows_list, split=None) -> tuple[list, list]:
        """Collated micro-batches on the device and, with the fused head, the flat rows of each
        that have a target (found on the host from the CPU tensors: no device sync)."""
        pad = self.tokenizer.pad_token_id
        split = self.data.train if split is None else split
        micro, rows = [], []
        for r in rows_list:
            mb = collate(split, r, pad_id=pad, packing=self.config.data.packing)
            idx = None
            if self.head is not None:
                lab, _ = torch_sft_labels(mb.input_ids, loss_mask=mb.loss_mask,
                                          attention_mask=mb.attention_mask,
                                          position_ids=mb.position_ids,
                                          document_ids=mb.document_ids)
                idx = target_rows(lab)  # [n] int64, CPU
                if idx.numel() == 0:  # nothing to train on (a filler row): all rows, exactly 0
                    idx = None
                else:
                    if self.device.type == "cuda":
                        idx = idx.pin_memory()
                    idx = idx.to(self.device, non_blocking=True)
            micro.append(mb.to(self.device))
            rows.append(idx)
        return micro, rows

    @property
    def varlen(self) -> bool:
        return self.attention is not None and self.attention.varlen

    def train_step(self, rows_list) -> dict:
        """One optimizer step over the micro-batches ``rows_list``; returns step metrics.

        On a logging step the loss, gradient norm and token counts are queued for the host as
        one device-to-host copy (``readback.DeviceRead``). With ``deferred_reads`` (CUDA) the
        step returns at once with ``pending`` and the trainer reads it after launching the next
        step, so the GPU never waits for the host; otherwise it is read here."""
        t0 = time.perf_counter()
        micro, rows = self._micro_batches(rows_list)
        labels, normalizer = self._labels(micro)
        loss_sum = self._forward_backward(micro, labels, normalizer, rows)
        grad_norm = self._unscale_and_clip()
        step = self.state.step + 1
        log_now = step % self.config.train.log_every == 0 or step == self.total_steps
        lr = self.optimizer.param_groups[0]["lr"]
        tokens = sum(mb.num_tokens for mb in micro)  # this rank's
        deferred = self.deferred_reads and self.guard.mode == "device"
        # the guard raises (stop) or returns False (skip) before the update; on CUDA it reads
        # its device flag only where the loss is read anyway (log_now), or (deferred) from the
        # snapshot that travels with the step's metrics
        apply = self.guard.check(loss_sum, grad_norm, step, sync=log_now and not deferred)
        self._update(apply)
        self.guard.check_params(step, sync=log_now and not deferred)
        out = {"tokens": tokens, "examples": sum(mb.num_examples for mb in micro), "lr": lr}
        if log_now:
            read = self._step_read(loss_sum, grad_norm, normalizer, tokens, deferred)
            if deferred:
                out["pending"] = read
            else:
                out.update(self._resolve(read, step))
        out["time"] = time.perf_counter() - t0
        return out

    def _step_read(self, loss_sum, grad_norm, normalizer, tokens: int, deferred: bool):
        """Queue the step's metrics (and, deferred, the guard's counters) for the host: one
        vector on the device, copied without waiting. Multi-process: the loss and token counts
        are summed over ranks first (a collective on the device, no host read)."""
        tokens_total = self.state.tokens_total + tokens
        counts = torch.tensor([tokens, tokens_total], dtype=torch.float64,
                              pin_memory=self.device.type == "cuda")
        sums = torch.cat([loss_sum.detach().double().reshape(1),
                          counts.to(self.device, non_blocking=True)])  # [3]
        if self.strategy.world_size > 1:  # each rank holds its share of the step's loss
            sums = self.strategy.all_reduce_sum(sums)
        parts = [sums, grad_norm.detach().double().reshape(1),
                 normalizer.detach().double().reshape(1)]
        guard_snap = self.guard.snapshot() if deferred else None
        if guard_snap is not None:
            parts.append(guard_snap)
        return DeviceRead(torch.cat(parts), guard=guard_snap is not None)

    def _resolve(self, read: "DeviceRead", step: int) -> dict:
        """Host values of a step read: loss, grad norm, counts (and the guard's verdict)."""
        v = read.values()
        out = {"loss": v[0], "step_tokens": int(v[1]), "tokens_all_ranks": int(v[2]),
               "grad_norm": v[3], "trainable": int(v[4])}
        if read.guard:
            if self.guard.fold(v[5:], step):
                out["skipped_nonfinite"] = True
        elif self.guard.skipped_now:
            out["skipped_nonfinite"] = True
        return out

    def _labels(self, micro) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Labels of every micro-batch and the step's trainable-target count over all ranks
        (a 0-dim fp32 device tensor: the loss normalizer)."""
        labels, count = [], torch.zeros((), dtype=torch.long, device=self.device)
        for mb in micro:
            lab, n = sft_labels(mb, self.loss_impl)
            labels.append(lab)
            count = count + n
        return labels, self.strategy.all_reduce_sum(count).to(torch.float32)

    def _forward_backward(self, micro, labels, normalizer, rows=None) -> torch.Tensor:
        """Forward, loss and backward of each micro-batch (gradients synced on the last one);
        returns this rank's summed loss (a device tensor). With the fused head the loss comes
        out of the model's forward (``head.py``), else from its logits."""
        impl = self.loss_impl
        self.model.train()
        scaling = self.scaler.is_enabled()
        grad_scale = self.scaler.scale(torch.ones((), device=self.device)) if scaling else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        factor = self.strategy.loss_factor
        tc = self.config.train
        rows = rows or [None] * len(micro)
        for i, (mb, lab, idx) in enumerate(zip(micro, labels, rows)):
            with self.strategy.grad_sync(self.model, enabled=i == len(micro) - 1):
                if self.head is not None:
                    req = HeadRequest(labels=lab, rows=idx, normalizer=normalizer,
                                      grad_scale=grad_scale, label_smoothing=tc.label_smoothing,
                                      z_loss=tc.z_loss, chunk_rows=self.head_chunk_rows)
                    with self.autocast(), posted(self.head, req):
                        self.model(**mb.model_inputs(varlen=self.varlen))
                    loss = self._head_loss(req)
                else:
                    with self.autocast():
                        logits = self.model(**mb.model_inputs(varlen=self.varlen)).logits
                    loss = token_loss(logits, lab, normalizer, impl,  # logits: [B, T, V]
                                      grad_scale=grad_scale if impl == "fused" else None,
                                      consume_logits=True, label_smoothing=tc.label_smoothing,
                                      z_loss=tc.z_loss)
                    del logits
                scaled = loss * factor if factor != 1.0 else loss
                (self.scaler.scale(scaled) if scaling else scaled).backward()
            loss_sum += loss.detach()
            del loss, scaled
        return loss_sum

    @staticmethod
    def _head_loss(req: HeadRequest) -> torch.Tensor:
        if req.loss is None:
            raise TrainingError("the model's forward did not call its output layer, so the fused "
                                "head computed no loss; pass --fused-head off")
        return req.loss

    def _unscale_and_clip(self) -> torch.Tensor:
        """The global gradient norm (before clipping), gradients unscaled and clipped.

        Where the optimizer step divides the gradients by a device scalar itself (torch's fused
        kernels, the guard's device mode, no grad scaler, whole-tensor strategies), clipping is
        folded into the step: the clip divisor max(1, (norm + 1e-6) / clip) is handed over as
        the step's ``grad_scale``, which spares the separate pass that multiplies every gradient
        (2.7 ms of a 146 ms 1B step on an H200, of which the fused step, dividing and writing
        the gradients back, pays about 1.7 ms back: bench/results/profile_a_*). Same update up to
        fp32 rounding of ``g / d`` against ``g * (1 / d)``; none at all for a step that is not
        clipped."""
        self._grad_divisor = None
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        folded = self.fold_clip and clip != float("inf")
        if folded or self.master.mode == "split":  # split: one process, so the norm is global
            norm = master_weights.total_norm_fp32([p.grad for p in params if p.grad is not None])
            if folded:
                self._grad_divisor = clip_divisor(norm, clip)
            return norm
        return self.strategy.clip_grad_norm_(params, clip)  # global over ranks

    def _update(self, apply: bool) -> None:
        """Optimizer step (unless the guard said skip), scheduler step, zeroed gradients."""
        if self.scaler.is_enabled():
            if apply:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # on a skip: its inf check ran in unscale_; the scale backs off
        elif apply:
            with self.guard.masked_update(self.optimizer, grad_divisor=self._grad_divisor):
                self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> dict:
        """Run to ``total_steps``, validate, save the final model; return the summary."""
        cfg = self.config
        st = self.state
        accum = cfg.train.grad_accum
        from tqdm.auto import tqdm

        # before any checkpoint the deferred step metrics are read too (they belong in it)
        self.checkpointer.before_save = self._before_save
        self.pm.hook.sftctl_train_start(run=self.context)
        if self.val_plan is not None and cfg.eval.initial and st.step == 0:
            self.evaluate()
        bar = self._bar = tqdm(total=self.total_steps, initial=st.step, desc="train",
                               unit="step", disable=cfg.train.quiet or not self.is_main,
                               dynamic_ncols=True, file=sys.stderr)
        self._last_read = (time.perf_counter(), st.step)
        # deferred reads time steps on the device: from one read step's event to the next
        self._last_event = start_event() if self.deferred_reads and \
            self.device.type == "cuda" else None
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
            epoch = round(st.epoch + st.micro_in_epoch / len(epoch_batches), 4)
            # the previous step's metrics, read now that this step is queued behind them
            self._flush_metrics()
            if "pending" in m:
                self._pending = (m, st.step, epoch)
            elif "loss" in m:
                self._emit(m, st.step, epoch)
            bar.update(1)
            eval_now = self.val_plan is not None and cfg.eval.every and \
                st.step % cfg.eval.every == 0 and st.step < self.total_steps
            if eval_now or st.step >= self.total_steps:
                self._flush_metrics()
            if eval_now:
                self.evaluate()
                self._restart_step_clock()
            self.checkpointer.step_end()  # periodic save; preemption: save and raise
            if getattr(self, "_saved_now", False):
                self._restart_step_clock()
            if self.stop_reason is not None:
                self._flush_metrics()
                log.info("stopping at step %d: %s", st.step, self.stop_reason)
                break
        self._flush_metrics()
        bar.close()
        if self.val_plan is not None and not (st.history and st.history[-1]["kind"] == "val"
                                              and st.history[-1]["step"] == st.step):
            self.evaluate()
        return self.finish()

    def _emit(self, m: dict, step: int, epoch: float) -> None:
        """History, the ``sftctl_step_end`` hooks and the progress bar for a read step."""
        st = self.state
        st.trainable_total += m["trainable"]
        metrics = {"kind": "train", "step": step, "epoch": epoch, "loss": m["loss"],
                   "lr": m["lr"], "tokens": m["step_tokens"], "trainable_tokens": m["trainable"],
                   "tokens_total": m["tokens_all_ranks"],
                   "tokens_per_s": m["step_tokens"] / max(m["time"], 1e-9),
                   "grad_norm": m["grad_norm"], "time": round(time.time() - self._t0, 3)}
        if m.get("skipped_nonfinite"):
            metrics["skipped_nonfinite"] = True
        st.history.append(metrics)
        self.pm.hook.sftctl_step_end(run=self.context, step=step, metrics=dict(metrics))
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

    def _flush_metrics(self) -> None:
        """Read and emit the deferred metrics of the last logged step, if any (it waits for that
        step only: later steps may still run on the device)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        m, step, epoch = pending
        t0 = time.perf_counter()
        read = m.pop("pending")
        m.update(self._resolve(read, step))
        now = time.perf_counter()
        self.state.train_time_s += now - t0
        # step time: on the device's clock where there is one (from the previous read step's
        # event to this one's), else on the host's between the two reads; over the steps in
        # between (the host launched them while the device ran)
        last_t, last_step = getattr(self, "_last_read", (t0, step - 1))
        steps = max(step - last_step, 1)
        last_ev = getattr(self, "_last_event", None)
        if last_ev is not None and read.event is not None:
            m["time"] = last_ev.elapsed_time(read.event) / 1000.0 / steps
            self._last_event = read.event
        else:
            m["time"] = (now - last_t) / steps
        self._last_read = (now, step)
        self._emit(m, step, epoch)

    def _before_save(self, step: int) -> None:
        """Before any checkpoint: the pending metrics (they belong in the saved history) and
        the guard's counters are read."""
        self._flush_metrics()
        self.guard.sync(step)
        self._saved_now = True

    def _restart_step_clock(self) -> None:
        """After a validation or a save (nothing pending): the next step's time starts now, so
        it does not include them."""
        self._saved_now = False
        self._last_read = (time.perf_counter(), self.state.step)
        if getattr(self, "_last_event", None) is not None:
            self._last_event = start_event()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (token mean over the whole validation set) and perplexity."""
        impl = self.loss_impl
        self.model.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        for rows in self.val_plan.batches(0):
            (mb,), (idx,) = self._micro_batches([rows], self.data.val)
            lab, n = sft_labels(mb, impl)
            if self.head is not None:  # plain NLL (no smoothing, no z-loss), summed
                req = HeadRequest(labels=lab, rows=idx, reduction="sum",
                                  chunk_rows=self.head_chunk_rows)
                with self.autocast(), posted(self.head, req):
                    self.model(**mb.model_inputs(varlen=self.varlen))
                total += self._head_loss(req).float()
            else:
                with self.autocast():
                    logits = self.model(**mb.model_inputs(varlen=self.varlen)).logits  # [B,T,V]
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
        # plugins may add keys to the validation metrics (documented in the hook spec)
        self.pm.hook.sftctl_evaluate(run=self.context, step=self.state.step, metrics=metrics)
        self.state.history.append(metrics)
        if self.is_main:
            log.info("step %d: val_loss %.4f, val_ppl %.3f", self.state.step, val_loss,
                     metrics["val_ppl"])
        return metrics

    # --------------------------------------------------------------------------- resumability

    def state_dict(self) -> dict:
        """The run's ``RunState`` as a dict (see ``state.py``), plus the world size."""
        sd = self.run_state.state_dict()
        sd["world_size"] = self.strategy.world_size
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict`` into a trainer that ran ``setup()`` with the same config
        (what the checkpointer does from files)."""
        if sd.get("world_size", 1) != self.strategy.world_size:
            raise TrainingError(f"the state was saved with world size {sd.get('world_size')}, "
                              f"this run has {self.strategy.world_size}")
        self.run_state.load_state_dict(sd)
        self.guard.reset_from_counters()

    # -------------------------------------------------------------------------------- finish

    def summary(self) -> dict:
        """summary.json (also ``model/sftctl_summary.json``): strict JSON, no NaN/Infinity.
        ``final_loss`` is the last *finite* logged training loss and ``final_loss_step`` its
        step; ``final_loss_reason`` says why that is not the last logged step (steps skipped by
        the non-finite guard) or why there is none (null otherwise). Any other non-finite
        number is written as null with a ``<key>_nonfinite`` flag, as in metrics.jsonl."""
        st = self.state
        d = self.data
        mem, mem_kind = peak_memory(self.device)
        train_hist = [h for h in st.history if h["kind"] == "train"]
        val_hist = [h for h in st.history if h["kind"] == "val"]
        cfg = self.config
        tokens = getattr(self, "_tokens_all_ranks", st.tokens_total)
        return _strict_json({
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
            "tokens": tokens,
            "trainable_tokens": st.trainable_total,
            "wall_time_s": round(time.time() - self._t0, 3),
            "train_time_s": round(st.train_time_s, 3),
            "tokens_per_s": tokens / max(st.train_time_s, 1e-9),
            "peak_memory_bytes": mem,
            "peak_memory_kind": mem_kind,
            "loss_kernel": self.loss_kernel,
            "loss_impl": self.loss_impl,
            "loss_head": self.head_info,
            "attention": self.attention.to_json() if self.attention is not None else None,
            "async_metrics": bool(self.deferred_reads and self.guard is not None
                                  and self.guard.mode == "device"),
            "fallbacks": self.fallbacks,
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else ""),
            "precision": self.precision,
            "master_weights": self.master.to_dict(),
            "cuda_allocator": self.cuda_allocator,
            "compiled": self.compiled,
            "cpu_threads": cpu_threads_info(),
            "world_size": self.strategy.world_size,
            "strategy": self.strategy.name,
            **_final_loss(train_hist),
            "initial_val_loss": val_hist[0]["val_loss"] if val_hist and val_hist[0]["step"] == 0
            else None,
            "val_loss": val_hist[-1]["val_loss"] if val_hist else None,
            "val_ppl": val_hist[-1]["val_ppl"] if val_hist else None,
            "stopped_early": self.stop_reason,
            "nonfinite_skipped": st.nonfinite_skipped,
            "tokens_added": self.tokens_added,
            "parameters": self.parameters,
            "resumed_from": self.resumed_from,
            "plugins": list(cfg.plugins),
            "versions": versions(),
            "benchmarks": self.benchmarks,
            "heldout": self.heldout,
        })

    def finish(self) -> dict:
        """Save the final model atomically, then summary.json; return the summary."""
        if self.strategy.world_size > 1:  # exact input-token count over all ranks
            self._tokens_all_ranks = int(self.strategy.all_reduce_sum(torch.tensor(
                self.state.tokens_total, dtype=torch.long, device=self.device)))
        self._flush_metrics()
        self.guard.sync(self.state.step)  # never save past an unread non-finite step
        summary = self.summary()
        model = self.unwrapped_model
        # the saved model is the plain one: the head's class and the attention implementation
        # go back to what transformers loaded (training is over)
        if self.head is not None:
            self.head.uninstall()
            self.head.uninstall_embedding_route()
        attention.uninstall(model)
        model.config.use_cache = True
        full = self.strategy.full_state_dict(self.model)  # every rank: FSDP gathers the shards
        if self.master.mode == "split":  # the checkpoint holds the fp32 masters, decoded
            full = master_weights.full_precision_state_dict(model, self.optimizer,
                                                            self.master.names)
        if self.is_main:
            with self.checkpointer.wrap_disk_errors(f"the final model {self.out_dir / 'model'}"):
                # plugins may save something else (an adapter merged into its base)
                out = self.pm.call_chain("sftctl_save_model", "model", run=self.context,
                                         model=model, state_dict=full,
                                         reset_on_replace=("state_dict",))
                if out is not model:
                    model, full = out, None
                    model.config.use_cache = True
                with atomic.atomic_directory(self.out_dir / "model") as tmp:
                    atomic.save_hf_model(model, self.tokenizer, tmp,
                                         config_yaml=atomic.config_yaml(self.config),
                                         summary=summary, state_dict=full)
                    self.pm.hook.sftctl_save(run=self.context, path=tmp)
        self.strategy.barrier()
        self.pm.hook.sftctl_after_train(run=self.context, summary=summary)
        if self.is_main:
            guards.disk_full_point("summary", self.out_dir)
            # plugins may have added keys: still strict JSON (non-finite -> null + flag)
            summary = _strict_json(summary)
            atomic.write_json(self.out_dir / "summary.json", summary)
        return summary
