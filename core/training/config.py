"""The training layer's typed configs: the ``model:``, ``optim:``, ``train:`` and ``eval:``
sections of a run config (``eval`` holds validation during training and which post-training
benchmarks to run)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_field import config_field as _f


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(
        None, flag="--model", metavar="PATH_OR_ID",
        help="Hugging Face causal LM: a local directory or a hub id, loaded with "
             "AutoModelForCausalLM/AutoTokenizer. Default: the embedded tiny Llama that sftctl "
             "builds from its own config and tokenizer (saved to OUTPUT_DIR/base/, no download).")
    tokenizer: str | None = _f(
        None, flag="--tokenizer", metavar="PATH_OR_ID",
        help="Tokenizer directory or hub id when it differs from --model.")
    revision: str | None = _f(None, flag="--revision", help="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = _f(
        False, flag="--trust-remote-code", cli="store_true",
        help="Allow model/tokenizer code from the hub repository to run (off by default).")
    allow_missing_weights: bool = _f(
        False, flag="--allow-missing-weights", cli="store_true",
        help="Train even when the checkpoint lacks weights the model has (they start randomly "
             "initialised, e.g. the head of a new task) or holds weights it does not use; "
             "without it, either is an error naming the tensors.")
    attn_implementation: str | None = _f(
        None, flag="--attn-implementation",
        choices=(None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        help="Attention kernel passed to from_pretrained (default: transformers' choice, sdpa).")
    gradient_checkpointing: bool = _f(
        False, flag="--gradient-checkpointing", cli="bool",
        help="Recompute activations in backward to save memory.")
    compile: bool | str = _f(
        "auto", flag="--compile", cli="bool", choices=(True, False, "auto"),
        help="torch.compile the forward of every transformer block (the model's "
             "_no_split_modules; the whole model's forward when it names none). Parameter "
             "names, checkpoints, DDP/FSDP hooks and the loss kernels are unchanged; the first "
             "steps pay the compilation. Default auto: on with CUDA for a transformers model "
             "(measured 1.34x faster on an H200) and for a LoRA (peft) model around one "
             "(1.70x PEFT + HF), off on the CPU, for a quantized base and for other plugin "
             "wrappers; --compile / --no-compile decide (see docs/performance.md).")
    packed_attention: str = _f(
        "auto", flag="--packed-attention", choices=("auto", "varlen", "model"),
        help="Attention over packed rows (--packing; padded rows too). auto: on CUDA, "
             "variable-length attention over the documents (flash-attn's varlen kernel when "
             "installed, else PyTorch's varlen_attn), no mask built; with --packing a model or "
             "kernel that cannot is a counted fallback to transformers' own path; on the CPU, "
             "transformers' own path. varlen: always sftctl's varlen attention (on the CPU its "
             "exact per-document reference). model: transformers' handling for "
             "--attn-implementation (sdpa: a block mask from the position ids).")


@dataclass
class OptimConfig:
    name: str = _f("adamw", flag="--optimizer",
                   help="Optimizer registered by a plugin (built-ins: adamw, adam, sgd, adafactor).")
    lr: float = _f(2e-5, flag="--lr", minimum=0.0, help="Peak learning rate.")
    weight_decay: float = _f(0.0, flag="--weight-decay", minimum=0.0, help="Weight decay.")
    betas: list[float] = _f(factory=lambda: [0.9, 0.999], flag="--betas", cli="nargs",
                            help="Adam betas (two floats).")
    eps: float = _f(1e-8, flag="--adam-eps", minimum=0.0, help="Adam epsilon.")
    momentum: float = _f(0.9, flag="--momentum", minimum=0.0, help="SGD momentum.")
    grad_clip: float = _f(1.0, flag="--grad-clip", minimum=0.0,
                          help="Clip the global gradient norm to this value (0: no clipping).")
    scheduler: str = _f("cosine", flag="--scheduler",
                        help="LR schedule registered by a plugin (built-ins: cosine, linear, "
                             "constant; each with warmup).")
    warmup_steps: int = _f(0, flag="--warmup-steps", minimum=0, help="Linear warmup steps.")
    warmup_ratio: float = _f(0.0, flag="--warmup-ratio", minimum=0.0, maximum=1.0,
                             help="Warmup as a fraction of the total steps (used when "
                                  "--warmup-steps is 0).")
    min_lr_ratio: float = _f(0.0, flag="--min-lr-ratio", minimum=0.0, maximum=1.0,
                             help="Final LR as a fraction of the peak (cosine, linear).")


@dataclass
class TrainConfig:
    output_dir: str | None = _f(
        None, flag="--output-dir", metavar="DIR",
        help="Run directory (config.yaml, metrics.jsonl, summary.json, model/). Default: "
             "runs/<YYYYmmdd-HHMMSS> under the current directory.")
    epochs: int = _f(1, flag="--epochs", minimum=1, help="Passes over the training data.")
    max_steps: int | None = _f(None, flag="--max-steps", minimum=1,
                               help="Stop after this many optimizer steps (overrides --epochs).")
    batch_size: int = _f(8, flag="--batch-size", minimum=1,
                         help="Examples (packed rows with --packing) per micro-batch per device.")
    grad_accum: int = _f(1, flag="--grad-accum", minimum=1,
                         help="Micro-batches per optimizer step.")
    seed: int = _f(42, flag="--seed", minimum=0, help="Seed for data order, init and dropout.")
    precision: str = _f("auto", flag="--precision", choices=("auto", "fp32", "bf16", "fp16"),
                        help="Autocast precision; master weights and optimizer state stay fp32 "
                             "(see --master-weights). auto: bf16 on CUDA when supported, else "
                             "fp32.")
    master_weights: str = _f(
        "auto", flag="--master-weights", choices=("auto", "split", "fp32"),
        help="How fp32 master weights of Linear layers are held under bf16 autocast. split: as "
             "the bf16 weight the layer computes with plus its 16 low bits in the optimizer "
             "state (the same fp32 masters and updates; bf16 gradients, 2 bytes per weight "
             "less, and no per-forward weight casts). auto: split on CUDA with bf16, one "
             "process, --grad-accum 1, no adapters and an optimizer that supports it (the "
             "built-in adamw), else fp32 with the reason in the log and summary.json. fp32: "
             "off. See docs/performance.md.")
    device: str = _f("auto", flag="--device",
                     help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
    threads: int | None = _f(None, flag="--threads", minimum=1,
                             help="CPU threads for torch (default: torch's choice, one per core). "
                                  "On a shared machine fewer threads avoid contention.")
    strategy: str = _f("auto", flag="--strategy", choices=("auto", "none", "ddp", "fsdp"),
                       help="Multi-process strategy under torchrun: ddp, or fsdp (FSDP2, sharded "
                            "per transformer block); none: one process. auto: none when "
                            "WORLD_SIZE is 1, else ddp. See docs/distributed.md.")
    loss_impl: str = _f("fused", flag="--loss-impl", choices=("fused", "torch"),
                        help="fused: sftctl's compiled cross-entropy and label op (default); "
                             "torch: the plain PyTorch reference path.")
    fused_head: str = _f(
        "auto", flag="--fused-head", choices=("auto", "on", "off"),
        help="With --loss-impl fused: compute the loss from the hidden states and the output "
             "layer's weight in one op (sftctl linear_cross_entropy; the [tokens, vocab] logits "
             "never exist), applying the model's own logit transforms (softcap, logit scale). "
             "auto: wherever the output layer is a plain linear head the setup probe accepts, "
             "else logits + cross-entropy, counted in summary.json's fallbacks; on: a model "
             "that cannot is an error; off: always logits + cross-entropy.")
    fused_head_chunk_rows: int = _f(
        0, flag="--fused-head-chunk-rows", minimum=0, metavar="ROWS",
        help="Rows per chunk of the fused head: the rows whose logits gradient (ROWS x vocab, "
             "bf16 under autocast) is kept for the head's two gradient GEMMs, each chunk one "
             "more pass of the weight-gradient GEMM. 0 (default): the op's choice: all of a step's "
             "trained tokens in one chunk when their gradient fits 1.5 GiB plus the fp32 "
             "weight-gradient accumulator that several chunks would need, else chunks of "
             "1.5 GiB (6272 rows at a 128256 vocabulary). Smaller: less memory at the end of "
             "the forward, where the peak usually is, for more time.")
    label_smoothing: float = _f(
        0.0, flag="--label-smoothing", minimum=0.0, below=1.0, metavar="EPS",
        help="Label smoothing of the training loss: each target's loss becomes (1 - EPS) * NLL + "
             "EPS * the mean over the vocabulary of -log p (0 <= EPS < 1; 0: off). The logged training loss "
             "includes it; val_loss and val_ppl stay the plain NLL, comparable across runs.")
    z_loss: float = _f(
        0.0, flag="--z-loss", minimum=0.0, metavar="COEF",
        help="Adds COEF * logsumexp(logits)^2 per trainable token to the training loss, keeping "
             "the softmax normalizer near 1 (COEF >= 0, e.g. 1e-4; 0: off). The logged training loss "
             "includes it; val_loss and val_ppl stay the plain NLL, comparable across runs.")
    report_to: list[str] = _f(
        factory=list, flag="--report-to", cli="nargs", metavar="NAME[,NAME]",
        help="Experiment trackers to log to (comma- or space-separated): tensorboard, wandb, "
             "mlflow, or a tracker a plugin registers; none: no tracker (the default). Needs "
             "pip install \"sftctl[trackers]\" (see README).")
    push_to_hub: str | None = _f(
        None, flag="--push-to-hub", metavar="REPO",
        help="After training (and the post-training evaluation), upload the model, its model "
             "card and the report to this Hugging Face Hub repository (needs a token: "
             "`hf auth login` or HF_TOKEN).")
    log_every: int = _f(1, flag="--log-every", minimum=1,
                        help="Write a metrics line every N optimizer steps.")
    async_metrics: str = _f(
        "auto", flag="--async-metrics", choices=("auto", "on", "off"),
        help="Read a logged step's loss, gradient norm and token counts (and the non-finite "
             "guard's device flags) after the next step has been queued, so the GPU never waits "
             "for the host; the step's metrics line and sftctl_step_end hooks then run one step "
             "later (a request_stop there ends training after the next step). auto: on with "
             "CUDA, off on the CPU (where a read is not a device sync).")
    cuda_allocator: str = _f(
        "auto", flag="--cuda-allocator", choices=("auto", "expandable", "torch"),
        help="How torch's CUDA caching allocator gets memory. expandable: segments that grow in "
             "place (expandable_segments:True), so batches whose sizes change from step to step "
             "(packed rows, chunked heads) do not fragment the cache into cudaFree calls, each a "
             "device sync. torch: torch's default. auto: expandable on CUDA unless "
             "PYTORCH_CUDA_ALLOC_CONF is set (then that is used as it is).")
    quiet: bool = _f(False, flag="--quiet", cli="store_true",
                     help="No progress bars and only warnings on stderr.")
    overwrite: bool = _f(False, flag="--overwrite", cli="store_true",
                         help="Allow an output directory that already holds a run.")
    save_every: int = _f(
        0, flag="--save-every", minimum=0,
        help="Save a resumable checkpoint (weights, optimizer, scheduler, RNGs, data position) "
             "every N optimizer steps to OUTPUT_DIR/checkpoints/step-N, atomically (0: only on "
             "SIGTERM/SIGINT). See docs/reliability.md.")
    keep_last: int = _f(2, flag="--keep-last", minimum=0,
                        help="Keep the newest K complete checkpoints; older ones are deleted "
                             "only after a new one is complete (0: keep all).")
    resume: str | None = _f(
        None, flag="--resume", cli="optional", metavar="PATH|latest",
        help="Continue an interrupted run exactly: 'latest' (the default when the flag has no "
             "value) takes the newest complete checkpoint of --output-dir and starts fresh if "
             "there is none; PATH is a checkpoint or a run directory. Use the interrupted run's "
             "options.")
    on_nonfinite: str = _f(
        "stop", flag="--on-nonfinite", choices=("stop", "skip"),
        help="A step with a non-finite loss or gradient norm is never applied. stop: end the run "
             "with an error naming the step (nothing is saved); skip: skip such steps, count "
             "them, and stop after --max-nonfinite-in-a-row.")
    max_nonfinite_in_a_row: int = _f(
        5, flag="--max-nonfinite-in-a-row", minimum=1,
        help="With --on-nonfinite skip: stop after this many skipped steps in a row.")


@dataclass
class EvalConfig:
    enabled: bool = _f(True, flag="--no-eval", cli="store_false",
                       help="Skip the post-training benchmarks and report.")
    every: int = _f(0, flag="--eval-every", minimum=0,
                    help="Validation loss and perplexity every N steps (0: at the end only).")
    initial: bool = _f(True, flag="--initial-eval", cli="bool",
                       help="Validate once before the first step (the untrained baseline).")
    batch_size: int | None = _f(None, flag="--val-batch-size", minimum=1,
                                help="Micro-batch size for validation (default: --batch-size).")
    tasks: list[str] = _f(factory=list, flag="--tasks", cli="nargs",
                          help="Benchmarks to run after training (default: those registered by "
                               "the --plugin plugins).")
    limit: int | None = _f(None, flag="--eval-limit", minimum=1,
                           help="Evaluate at most this many examples per benchmark.")
    heldout: str | None = _f(
        None, flag="--heldout", metavar="PATH_OR_ID",
        help="Held-out records (in the run's data format) for the benchmark of your own data "
             "after training. Default with --data: the --val-data/--val-split records, else a "
             "slice of --data held out of training (--heldout-size).")
    heldout_size: int | None = _f(
        None, flag="--heldout-size", minimum=0,
        help="Records of --data held out of training for that benchmark when no --heldout, "
             "--val-data or --val-split is given (default: 5%%, at most 200, none below 20 "
             "records; 0: none).")
    # evaluation that steers the run (sftctl.evals.steering; docs/evaluation.md)
    benchmark_every: int = _f(
        0, flag="--benchmark-every", minimum=0,
        help="Benchmark the periodic checkpoint every N steps during training (a subset: "
             "--benchmark-limit documents per benchmark), plotted against the step in the "
             "report; sets --save-every N when it is 0 (0: off).")
    benchmark_limit: int = _f(
        50, flag="--benchmark-limit", minimum=1, metavar="K",
        help="Documents per benchmark at each --benchmark-every step and for the final model's "
             "point of that series.")
    select_best: str | None = _f(
        None, flag="--select-best", metavar="TASK:METRIC",
        help="After training, make model/ the benchmarked checkpoint (or the final model) with "
             "the best TASK:METRIC of the --benchmark-every series; the final model then moves "
             "to model_final/.")
    require: list[str] = _f(
        factory=list, flag="--require", cli="append", metavar="GATE",
        help="A gate on the final benchmark, e.g. 'TASK:METRIC>=0.8' (the SFT score) or "
             "'TASK:METRIC:delta>=0.05' (SFT minus base); operators >=, >, <=, <; repeatable. "
             "A failed gate ends the run with exit code 5 after everything is written.")
