"""The run configuration: one typed, validated tree built from defaults, YAML and the command line.

Design choices
- One dataclass per component (``ModelConfig``, ``DataConfig``, ``OptimConfig``, ``TrainConfig``,
  ``EvalConfig``) under a root ``RunConfig``. The YAML file has the same shape (sections
  ``model:``, ``data:``, ``optim:``, ``train:``, ``eval:``, plus ``plugins:`` and ``options:``).
- Every field carries its help text and, where it has one, its command-line flag in the field's
  metadata; the CLI is generated from this table, so ``--help``, YAML keys and flags cannot drift.
- Layers are merged as plain dicts, then validated once: dataclass defaults < a plugin's tuned
  defaults (only for the embedded demo model) < ``--config run.yaml`` < flags and ``--set``.
  Validation is strict: unknown keys (with a "did you mean" hint), wrong types and out-of-range
  values are ``ConfigError``s naming the source and the dotted key.
- Plugins add options through the ``sftctl_add_options`` hook; those live under ``options:``
  (dotted names such as ``metrics.flush_every``) and are validated against their declared type.
- PyYAML reads ``1e-3`` as a string (YAML 1.1); numeric strings are accepted for numeric fields so
  that the common way of writing a learning rate works.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError


def _f(default=dataclasses.MISSING, *, help: str, flag: str | None = None,
       choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
       factory: Callable | None = None, metavar: str | None = None, cli: str = "value"):
    """A config field with its documentation and CLI flag.

    ``cli`` says how the flag behaves: "value" (takes a value), "bool" (--x / --no-x),
    "store_true", "store_false", "append" (repeatable, builds a list), "nargs" (one or more values).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum,
            "maximum": maximum, "metavar": metavar, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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
    attn_implementation: str | None = _f(
        None, flag="--attn-implementation",
        choices=(None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        help="Attention kernel passed to from_pretrained (default: transformers' choice, sdpa).")
    gradient_checkpointing: bool = _f(
        False, flag="--gradient-checkpointing", cli="bool",
        help="Recompute activations in backward to save memory.")
    compile: bool = _f(
        False, flag="--compile", cli="bool",
        help="torch.compile the forward of every transformer block (the model's "
             "_no_split_modules; the whole model's forward when it names none). Parameter "
             "names, checkpoints, DDP/FSDP hooks and the loss kernels are unchanged; the first "
             "steps pay the compilation.")


@dataclass
class DataConfig:
    paths: list[str] = _f(
        factory=list, flag="--data", cli="nargs", metavar="PATH_OR_ID",
        help="Training data: JSON, JSONL, Parquet or CSV files, a saved `datasets` directory, or a "
             "hub dataset id (several allowed). Default: the demo data of the --plugin format.")
    val_paths: list[str] = _f(
        factory=list, flag="--val-data", cli="nargs", metavar="PATH_OR_ID",
        help="Validation data, same kinds as --data.")
    format: str | None = _f(
        None, flag="--format",
        help="Dataset format (registered by a plugin, see `sftctl plugins`). Default: the format "
             "of the first --plugin that registers one, else 'alpaca'.")
    split: str = _f("train", flag="--split",
                    help="Split to train on for hub ids and saved DatasetDicts.")
    val_split: str | None = _f(
        None, flag="--val-split",
        help="Split of the --data sources used for validation (hub ids, saved DatasetDicts).")
    val_fraction: float = _f(
        0.0, flag="--val-fraction", minimum=0.0, maximum=0.5,
        help="Hold out this fraction of the training records for validation when no "
             "validation data is given (0: no validation set).")
    max_seq_len: int = _f(1024, flag="--max-seq-len", minimum=2,
                          help="Tokens per example (and per packed row); longer examples are "
                               "truncated and counted.")
    packing: bool = _f(
        False, flag="--packing", cli="bool",
        help="Padding-free packing: concatenate examples into rows of --max-seq-len tokens, "
             "position ids restart per document and attention never crosses documents.")
    train_on_prompt: bool = _f(False, flag="--train-on-prompt", cli="bool",
                               help="Also compute the loss on prompt tokens (default: response only).")
    skip_invalid: bool = _f(
        False, flag="--skip-invalid", cli="store_true",
        help="Skip invalid records (counted in the summary) instead of stopping with an error.")
    num_proc: int | None = _f(
        None, flag="--num-proc", minimum=1,
        help="Processes for tokenization (datasets.map). Default: 1 below 50k records, else "
             "min(8, CPU count).")
    max_examples: int | None = _f(None, flag="--max-examples", minimum=1,
                                  help="Use at most this many training records (after loading).")
    cache_dir: str | None = _f(None, flag="--cache-dir",
                               help="datasets cache directory (default: the datasets default).")


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
                        help="Autocast precision; weights stay fp32. auto: bf16 on CUDA when "
                             "supported, else fp32.")
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
    log_every: int = _f(1, flag="--log-every", minimum=1,
                        help="Write a metrics line every N optimizer steps.")
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


@dataclass
class RunConfig:
    plugins: list[str] = _f(factory=list, flag="--plugin", cli="append", metavar="NAME",
                            help="Enable a plugin (repeatable); its dataset format becomes the "
                                 "default. See `sftctl plugins`.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Options added by plugins (see `sftctl plugins`)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def option(self, name: str) -> Any:
        """Value of a plugin option (its default when not set)."""
        if name not in self.options:
            raise KeyError(f"plugin option {name!r} is not registered")
        return self.options[name]


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "eval": EvalConfig}


@dataclass(frozen=True)
class ConfigOption:
    """An option a plugin adds (registered through ``sftctl_add_options``).

    ``name`` is dotted (``"myplugin.threshold"``); YAML key ``options: {myplugin.threshold: 3}``,
    flag ``--myplugin-threshold`` (dots and underscores become dashes).
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    plugin: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace(".", "-").replace("_", "-")


# --------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted. ``where`` names it."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} "
                          f"{value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got a boolean {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got a boolean {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(known))}")


def _check_range(value, meta: dict, where: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"{where}: {value!r} is not one of {shown}")
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"{where}: {value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}: {value!r} is above the maximum {hi}")


def _build_section(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, fields, where)
        sub = f"{where}.{key}" if where else key
        v = coerce(value, hints[key], sub)
        _check_range(v, fields[key].metadata, sub)
        kwargs[key] = v
    return cls(**kwargs)


def build_config(layers: list[tuple[str, dict]],
                 options: dict[str, ConfigOption] | None = None) -> RunConfig:
    """Merge ``(source name, nested dict)`` layers (later wins) and validate into a RunConfig.

    ``options`` are the plugin options registered through the hook; ``options:`` keys outside it
    are errors. Each error names the layer (file or "command line") and the dotted key.
    """
    options = options or {}
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}  # dotted key -> layer that set it, for error messages
    top_fields = {f.name for f in dataclasses.fields(RunConfig)}
    for source, data in layers:
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the config must be a mapping of sections, got "
                              f"{type(data).__name__}")
        for key, value in data.items():
            if key not in top_fields:
                raise _unknown_key(key, top_fields, source)
            if key in SECTIONS or key == "options":
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: section {key!r} must be a mapping, got "
                                      f"{type(value).__name__}")
                dest = merged.setdefault(key, {})
                for k, v in value.items():
                    dest[k] = v
                    origin[f"{key}.{k}"] = source
            else:
                merged[key] = value
                origin[key] = source

    def src(dotted: str) -> str:
        return f"{origin.get(dotted, 'config')}: {dotted}"

    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = merged.get(name, {})
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        built = {}
        for key, value in section.items():
            if key not in fields:
                raise _unknown_key(key, fields, origin.get(f"{name}.{key}", "config") +
                                   f": section {name!r}")
            v = coerce(value, hints[key], src(f"{name}.{key}"))
            _check_range(v, fields[key].metadata, src(f"{name}.{key}"))
            built[key] = v
        kwargs[name] = cls(**built)
    if "plugins" in merged:
        kwargs["plugins"] = coerce(merged["plugins"], list[str], src("plugins"))
    opt_values = {name: o.default for name, o in options.items()}
    for key, value in merged.get("options", {}).items():
        if key not in options:
            where = origin.get(f"options.{key}", "config")
            if not options:
                raise ConfigError(f"{where}: unknown plugin option {key!r}; no plugin registers "
                                  "options")
            raise _unknown_key(key, options, f"{where}: options")
        o = options[key]
        v = coerce(value, o.type, src(f"options.{key}"))
        if o.choices is not None and v not in o.choices:
            raise ConfigError(f"{src('options.' + key)}: {v!r} is not one of "
                              f"{', '.join(map(str, o.choices))}")
        opt_values[key] = v
    cfg = RunConfig(**kwargs, options=opt_values)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a single field's type and range cannot express."""
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.data.val_paths and cfg.data.val_fraction > 0:
        raise ConfigError("data.val_fraction and data.val_paths are exclusive: give one")
    if cfg.data.val_split and cfg.data.val_fraction > 0:
        raise ConfigError("data.val_split and data.val_fraction are exclusive: give one")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device: {dev!r} is not auto, cpu, cuda or cuda:N")


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file; a missing file or a syntax error is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections, got {type(data).__name__}")
    return data


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 1e-4)`` -> ``d["optim"]["lr"] = 1e-4``; options keep dots."""
    head, _, rest = dotted.partition(".")
    if not rest:
        tree[head] = value
    elif head == "options":
        tree.setdefault("options", {})[rest] = value
    else:
        tree.setdefault(head, {})[rest] = value


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def iter_fields():
    """Yield ``(dotted key, dataclass field, annotation)`` for every config field."""
    hints = _hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            sec_hints = _hints(SECTIONS[f.name])
            for sf in dataclasses.fields(SECTIONS[f.name]):
                yield f"{f.name}.{sf.name}", sf, sec_hints[sf.name]
        elif f.name != "options":
            yield f.name, f, hints[f.name]
