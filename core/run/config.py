"""The run configuration: one typed, validated tree built from defaults, YAML and the command line.

Design choices
- One dataclass per component (``ModelConfig``, ``DataConfig``, ``OptimConfig``, ``TrainConfig``,
  ``EvalConfig``) under a root ``RunConfig``. The YAML file has the same shape (sections
  ``model:``, ``data:``, ``optim:``, ``train:``, ``eval:``, plus ``plugins:`` and ``options:``).
- Every field carries its help text and, where it has one, its command-line flag in the field's
  metadata; the CLI is generated from this table, so ``--help``, YAML keys and flags cannot drift.
- Layers are merged as plain dicts, then validated once: dataclass defaults < derived defaults
  (the dataset format of the first ``--plugin`` that registers one) < a format's tuned defaults
  (only for its embedded demo model) < the enabled plugins' defaults (``sftctl_config_defaults``)
  < ``--config run.yaml`` < flags and ``--set``. The rules
  live here (``run_layers``); the CLI only parses arguments into dicts.
  Validation is strict: unknown keys (with a "did you mean" hint), wrong types and out-of-range
  values are ``ConfigError``s naming the source and the dotted key.
- Plugins add options through the ``sftctl_add_options`` hook; those live under ``options:``
  (dotted names such as ``metrics.flush_every``) and are validated against their declared type.
- Numbers must be numbers: a quoted ``max_steps: "10"`` is an error, as ``--max-steps ten`` is.
  One exception: PyYAML (YAML 1.1) reads exponent notation without a dot or without an exponent
  sign (``1e-3``, ``2.5e3``) as a string, so a float field accepts a string of exactly that
  shape (``_YAML11_MISSED_FLOAT``); nothing else (not "0.001", "nan" or "inf"). Float values
  must be finite (``--lr nan``/``inf``, ``--grad-clip inf`` are errors; 0 disables clipping).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config_field import config_field as _f
from ..data.config import DataConfig
from ..errors import ConfigError
from ..training.config import EvalConfig, ModelConfig, OptimConfig, TrainConfig


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


# Exponent notation that PyYAML (YAML 1.1: a dot and a signed exponent are required) reads as a
# string although YAML 1.2 reads it as a float: `1e-3`, `5E+4`, `2.5e3`. Only these strings are
# accepted for float fields; quoted numbers ("0.001", "10") and "nan"/"inf" are refused.
_YAML11_MISSED_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


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
        if isinstance(value, str):  # a quoted number in YAML: refused like `--max-steps ten`
            raise ConfigError(f"{where}: expected an integer, got the string {value!r} (write "
                              "numbers without quotes)")
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got a boolean {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _YAML11_MISSED_FLOAT.match(value):
            return float(value)  # `lr: 1e-3`: a float in YAML 1.2, a string to PyYAML
        if isinstance(value, str):
            raise ConfigError(f"{where}: expected a number, got the string {value!r} (write "
                              "numbers without quotes)")
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
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every < and >
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"{where}: {value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}: {value!r} is above the maximum {hi}")
        below = meta.get("below")
        if below is not None and value >= below:
            raise ConfigError(f"{where}: {value!r} must be below {below}")


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
    layer_of: dict[str, int] = {}  # dotted key -> index of the layer that set it
    for layer_index, (source, data) in enumerate(layers):
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
                    layer_of[f"{key}.{k}"] = layer_index
            else:
                merged[key] = value
                origin[key] = source

    def src(dotted: str) -> str:
        return f"{origin.get(dotted, 'config')}: {dotted}"

    _one_warmup(merged.get("optim", {}), layer_of, src)
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
        # null is the value of an unset option whose default is None (a run's own config.yaml
        # writes it back that way)
        v = None if value is None and o.default is None else \
            coerce(value, o.type, src(f"options.{key}"))
        if o.choices is not None and v not in o.choices:
            raise ConfigError(f"{src('options.' + key)}: {v!r} is not one of "
                              f"{', '.join(map(str, o.choices))}")
        opt_values[key] = v
    cfg = RunConfig(**kwargs, options=opt_values)
    validate(cfg)
    return cfg


def _one_warmup(optim: dict, layer_of: dict[str, int], src) -> None:
    """``warmup_steps`` and ``warmup_ratio`` both set (non-zero): an error when one layer sets
    both; else the higher layer's wins (``--warmup-ratio`` on the command line replaces the
    ``warmup_steps`` of a format's tuned defaults or of the config file)."""
    steps, ratio = optim.get("warmup_steps"), optim.get("warmup_ratio")
    if not steps or not ratio:
        return
    a, b = layer_of["optim.warmup_steps"], layer_of["optim.warmup_ratio"]
    if a == b:
        raise ConfigError(f"{src('optim.warmup_steps')} ({steps}) and optim.warmup_ratio "
                          f"({ratio}) exclude each other: give one")
    del optim["warmup_ratio" if a > b else "warmup_steps"]


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


def check_eval_every(cfg: RunConfig, user_layers: list[tuple[str, dict]]) -> None:
    """``--eval-every N`` given by the user (flag or config file) with ``--data`` and no
    validation set would be ignored: an error naming the options that give one. Only the user's
    layers count: a format's tuned ``eval.every`` (for its demo data, which has a validation
    split) must not make ``--data`` without one fail. ``--no-eval`` is no conflict: it skips the
    benchmarks after training, not validation during it."""
    source = every = None
    for name, layer in user_layers:
        sec = layer.get("eval")
        if isinstance(sec, dict) and sec.get("every") is not None:
            source, every = name, sec["every"]
    if not every or not cfg.data.paths:  # no --data: the format's demo brings its validation
        return
    d = cfg.data
    if not d.val_paths and not d.val_split and d.val_fraction == 0:
        raise ConfigError(f"{source}: --eval-every {every} (eval.every) asks for the validation "
                          f"loss every {every} steps but there is no validation set: give "
                          "--val-data, --val-split or --val-fraction, or drop --eval-every")


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


def run_layers(cli: dict, file_layer: dict, file_name: str, pm) -> list[tuple[str, dict]]:
    """The config layers of ``sftctl train``, lowest first (see the module docstring):

    1. derived defaults: the enabled plugins (from the file and the command line) and the dataset
       format (``data.format``, else the first ``--plugin`` that registers one, else alpaca);
    2. the format's tuned defaults (``DatasetFormat.demo_config``), only when training its
       embedded demo model (no ``model.name_or_path`` anywhere), then the defaults the enabled
       plugins return from ``sftctl_config_defaults``;
    3. the ``--config`` file;
    4. the command line (flags and ``--set``);
    5. a fresh ``runs/<timestamp>`` output directory when none is given and nothing is resumed.

    ``cli`` and ``file_layer`` are nested dicts; unknown plugins are refused by ``pm.require``.
    The file's TRL/Axolotl names (``learning_rate``, ``micro_batch_size``, ...) are mapped onto
    sftctl's keys first, with a notice (``aliases.py``).
    """
    import logging

    from .aliases import apply_aliases

    file_layer = apply_aliases(file_layer, file_name, logging.getLogger("sftctl"))
    def get(layer, dotted):
        head, _, rest = dotted.partition(".")
        sec = layer.get(head)
        if not rest:
            return sec
        return sec.get(rest) if isinstance(sec, dict) else None

    def given(dotted):
        return get(cli, dotted) or get(file_layer, dotted)

    plugins: list[str] = []
    for layer in (file_layer, cli):
        for name in (get(layer, "plugins") or []):
            if isinstance(name, str) and name not in plugins:
                plugins.append(name)
    pm.require(plugins)
    derived: dict = {"plugins": plugins}
    fmt = given("data.format")
    if fmt is None:
        owned = [f for name in plugins for f in
                 ([name] if name in pm.formats_of(name) else pm.formats_of(name)[:1])]
        fmt = owned[0] if owned else "alpaca"
        set_dotted(derived, "data.format", fmt)
    layers: list[tuple[str, dict]] = [("defaults", derived)]
    formats = pm.dataset_formats()
    if given("model.name_or_path") is None and fmt in formats and formats[fmt].demo_config:
        path = formats[fmt].demo_config
        layers.append((path, load_yaml(path)))
    # the enabled plugins' own defaults (e.g. lora's learning rate), below the user's layers
    layers += pm.config_defaults(plugins, fmt, given("model.name_or_path") is None)
    layers.append((file_name, {k: v for k, v in file_layer.items() if k != "plugins"}))
    layers.append(("command line", {k: v for k, v in cli.items() if k != "plugins"}))
    if not given("train.output_dir") and not given("train.resume"):  # resume picks the dir
        import time

        stamp = time.strftime("%Y%m%d-%H%M%S")
        layers.append(("defaults", {"train": {"output_dir": str(Path("runs") / stamp)}}))
    return layers
