"""Familiar names: the flat keys of TRL (``SFTConfig``/``TrainingArguments``) and Axolotl YAML
files mapped onto sftctl's config keys.

Design choices
- Only top-level keys of a ``--config`` file are translated, and only where the meaning is the
  same (``learning_rate`` -> ``optim.lr``, ``micro_batch_size`` -> ``train.batch_size``, ...);
  every mapping is announced in one notice line naming each ``alias -> key``, so the user learns
  sftctl's names. ``sftctl config import FILE`` writes the translated file in sftctl's own shape
  and lists what it could not map.
- A value that has no clean equivalent is refused, not approximated: ``num_train_epochs: 2.5``
  (sftctl counts whole epochs), ``lr_scheduler_type: polynomial``, ``bf16: true`` together with
  ``fp16: true``. Keys that TRL/Axolotl know and sftctl does not (``deepspeed``, ``fsdp``,
  ``wandb_watch``, ...) are errors naming them (the run would silently differ otherwise), with
  the hint that ``sftctl config import`` drops them.
- Conflicts are errors naming both spellings: an alias and its sftctl key in the same file
  (``learning_rate`` and ``optim.lr``), or two aliases of one key (``micro_batch_size`` and
  ``per_device_train_batch_size``).
- ``false``/``null``/TRL's "unset" values (``max_steps: -1``, ``report_to: none``) map to sftctl's
  defaults, never to a surprising value.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError


class Unmappable(ValueError):
    """An alias whose value has no clean sftctl equivalent."""


def _int_epochs(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Unmappable(f"expected a whole number of epochs, got {v!r}")
    if float(v) != int(v):
        raise Unmappable(f"{v} epochs: sftctl trains whole epochs (use max_steps for a part)")
    return int(v)


def _max_steps(v):
    return None if v in (-1, 0, None) else v


_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
               "constant_with_warmup": "constant"}


def _scheduler(v):
    if v not in _SCHEDULERS:
        raise Unmappable(f"{v!r} has no sftctl equivalent; sftctl has "
                         f"{', '.join(sorted(_SCHEDULERS))} (each with warmup)")
    return _SCHEDULERS[v]


_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
               "adamw": "adamw", "adam": "adam", "sgd": "sgd", "adafactor": "adafactor"}


def _optimizer(v):
    if v not in _OPTIMIZERS:
        raise Unmappable(f"{v!r} has no sftctl equivalent; mapped names: "
                         f"{', '.join(sorted(_OPTIMIZERS))}")
    return _OPTIMIZERS[v]


def _report_to(v):
    items = v if isinstance(v, list) else [v]
    return [str(x) for x in items if str(x).lower() not in ("none", "")]


def _resume(v):
    if v is True:
        return "latest"
    if v in (False, None):
        return None
    return v


def _val_fraction(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 0.5:
        return float(v)
    raise Unmappable(f"{v!r}: sftctl holds out a fraction of at most 0.5 (--val-fraction)")


def _same(v):
    return v


# alias -> (sftctl dotted key, conversion)
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "learning_rate": ("optim.lr", _same),
    "per_device_train_batch_size": ("train.batch_size", _same),
    "micro_batch_size": ("train.batch_size", _same),
    "per_device_eval_batch_size": ("eval.batch_size", _same),
    "eval_batch_size": ("eval.batch_size", _same),
    "gradient_accumulation_steps": ("train.grad_accum", _same),
    "num_train_epochs": ("train.epochs", _int_epochs),
    "num_epochs": ("train.epochs", _int_epochs),
    "max_length": ("data.max_seq_len", _same),
    "max_seq_length": ("data.max_seq_len", _same),
    "sequence_len": ("data.max_seq_len", _same),
    "base_model": ("model.name_or_path", _same),
    "model_name_or_path": ("model.name_or_path", _same),
    "tokenizer_config": ("model.tokenizer", _same),
    "tokenizer_name_or_path": ("model.tokenizer", _same),
    "trust_remote_code": ("model.trust_remote_code", _same),
    "gradient_checkpointing": ("model.gradient_checkpointing", _same),
    "torch_compile": ("model.compile", _same),
    "warmup_steps": ("optim.warmup_steps", _same),
    "warmup_ratio": ("optim.warmup_ratio", _same),
    "weight_decay": ("optim.weight_decay", _same),
    "max_grad_norm": ("optim.grad_clip", _same),
    "adam_epsilon": ("optim.eps", _same),
    "lr_scheduler_type": ("optim.scheduler", _scheduler),
    "lr_scheduler": ("optim.scheduler", _scheduler),
    "optim": ("optim.name", _optimizer),
    "optimizer": ("optim.name", _optimizer),
    "output_dir": ("train.output_dir", _same),
    "seed": ("train.seed", _same),
    "max_steps": ("train.max_steps", _max_steps),
    "logging_steps": ("train.log_every", _same),
    "save_steps": ("train.save_every", _same),
    "save_total_limit": ("train.keep_last", _same),
    "eval_steps": ("eval.every", _same),
    "resume_from_checkpoint": ("train.resume", _resume),
    "report_to": ("train.report_to", _report_to),
    "hub_model_id": ("train.push_to_hub", _same),
    "packing": ("data.packing", _same),
    "sample_packing": ("data.packing", _same),
    "train_on_inputs": ("data.train_on_prompt", _same),
    "dataset_num_proc": ("data.num_proc", _same),
    "val_set_size": ("data.val_fraction", _val_fraction),
    "dataset_prepared_path": ("data.cache_dir", _same),
    "wandb_project": ("options.wandb.project", _same),
    "wandb_entity": ("options.wandb.entity", _same),
    "wandb_name": ("options.wandb.name", _same),
    "lora_r": ("options.lora.r", _same),
    "lora_alpha": ("options.lora.alpha", _same),
    "lora_dropout": ("options.lora.dropout", _same),
    "label_smoothing_factor": ("train.label_smoothing", _same),
}

# known to TRL/Axolotl, no sftctl equivalent: refused in a --config file, dropped (and listed)
# by `sftctl config import`
NO_EQUIVALENT = {
    "deepspeed", "fsdp", "fsdp_config", "tf32", "load_in_8bit", "flash_attention",
    "xformers_attention", "sdp_attention", "wandb_watch", "wandb_log_model", "wandb_mode",
    "logging_dir", "evaluation_strategy", "eval_strategy", "save_strategy", "logging_strategy",
    "dataloader_num_workers", "group_by_length", "special_tokens", "tokens", "strict",
    "early_stopping_patience", "local_rank", "ddp_find_unused_parameters", "neftune_noise_alpha",
    "push_to_hub", "hub_strategy", "hub_private_repo", "auto_find_batch_size", "adapter",
    "lora_target_modules", "lora_target_linear", "datasets", "dataset_text_field", "chat_template",
    "bf16", "fp16", "adam_beta1", "adam_beta2", "load_in_4bit", "test_datasets",
    "completion_only_loss", "assistant_only_loss", "gradient_checkpointing_kwargs",
    "warmup", "loss_watchdog_threshold", "bf16_full_eval",
}
# handled together (several keys -> one value) below
_SPECIAL = {"bf16", "fp16", "adam_beta1", "adam_beta2", "adapter", "lora_target_modules",
            "lora_target_linear", "datasets", "test_datasets", "push_to_hub"}

_AXOLOTL_TYPES = {"alpaca": ("alpaca", None), "chat_template": ("chat", None),
                  "sharegpt": ("chat", None)}


def _get(tree: dict, dotted: str):
    head, _, rest = dotted.partition(".")
    sec = tree.get(head)
    if not rest:
        return sec
    return sec.get(rest) if isinstance(sec, dict) else None


def _put(tree: dict, dotted: str, value) -> None:
    head, _, rest = dotted.partition(".")
    if head == "options":
        tree.setdefault("options", {})[rest] = value
    elif rest:
        tree.setdefault(head, {})[rest] = value
    else:
        tree[head] = value


def _datasets(v, key):
    """Axolotl ``datasets: [{path, type, split}]`` -> (paths, format, split)."""
    if not isinstance(v, list) or not v:
        raise Unmappable("expected a list of {path, type}")
    paths, formats, splits = [], set(), set()
    for i, d in enumerate(v):
        if isinstance(d, str):
            paths.append(d)
            continue
        if not isinstance(d, dict) or "path" not in d:
            raise Unmappable(f"{key}[{i}]: expected a mapping with a path")
        extra = set(d) - {"path", "type", "split"}
        if extra:
            raise Unmappable(f"{key}[{i}]: {', '.join(sorted(extra))} have no sftctl "
                             "equivalent")
        t = d.get("type")
        if t is not None:
            if not isinstance(t, str) or t not in _AXOLOTL_TYPES:
                raise Unmappable(f"{key}[{i}].type {t!r}: mapped types are "
                                 f"{', '.join(sorted(_AXOLOTL_TYPES))}")
            formats.add(_AXOLOTL_TYPES[t][0])
        if d.get("split") is not None:
            splits.add(d["split"])
        paths.append(str(d["path"]))
    if len(formats) > 1 or len(splits) > 1:
        raise Unmappable(f"{key}: one format and one split for every entry (sftctl trains one "
                         "format per run)")
    return paths, (formats.pop() if formats else None), (splits.pop() if splits else None)


def translate(data: dict, source: str, *, strict: bool = True
              ) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]:
    """Map the TRL/Axolotl keys of a config mapping onto sftctl's shape.

    Returns (translated mapping, [(alias, sftctl key)], [(key, why not mapped)]). With
    ``strict`` (a ``--config`` file) anything that cannot be mapped and every conflict raise a
    ``ConfigError`` naming the key(s); without it (``sftctl config import``) unmappable keys are
    returned and conflicts still raise.
    """
    from .config import RunConfig
    import dataclasses

    top = {f.name for f in dataclasses.fields(RunConfig)}
    def native(k, v) -> bool:  # TRL's `optim: adamw_torch` is an alias, sftctl's is a section
        return k in top and not (k == "optim" and isinstance(v, str))

    out: dict = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()
                 if native(k, v)}
    mapped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    set_by: dict[str, str] = {}

    def fail(key: str, why: str):
        if strict:
            raise ConfigError(f"{source}: {key}: {why}" + (
                "" if why.endswith(")") else
                " (`sftctl config import FILE` converts a TRL/Axolotl file and lists what it "
                "cannot map)"))
        dropped.append((key, why))

    def assign(alias: str, dotted: str, value) -> None:
        if dotted in set_by:
            raise ConfigError(f"{source}: {set_by[dotted]} and {alias} both set {dotted}: "
                              "give one")
        if _get(out, dotted) is not None:
            raise ConfigError(f"{source}: {alias} (an alias of {dotted}) and {dotted} are both "
                              "given: give one")
        set_by[dotted] = alias
        if value is not None:
            _put(out, dotted, value)
        mapped.append((alias, dotted))

    for key, value in data.items():
        if native(key, value):
            continue
        if key in ALIASES:
            dotted, conv = ALIASES[key]
            try:
                assign(key, dotted, conv(value))
            except Unmappable as e:
                fail(key, str(e))
        elif key in _SPECIAL:
            continue
        elif key in NO_EQUIVALENT:
            fail(key, "a TRL/Axolotl option with no sftctl equivalent; remove it")
        elif strict:
            out[key] = value  # unknown: build_config's "unknown key" error (did you mean ...)
    # keys that map together
    bf16, fp16 = data.get("bf16"), data.get("fp16")
    if bf16 is not None or fp16 is not None:
        if bf16 is True and fp16 is True:
            fail("bf16", "bf16 and fp16 are both true: give one")
        elif bf16 not in (None, True, False, "auto") or fp16 not in (None, True, False):
            fail("bf16" if bf16 not in (None, True, False, "auto") else "fp16",
                 f"expected true, false (or auto for bf16), got {bf16 if bf16 is not None else fp16!r}")
        else:
            value = ("auto" if bf16 == "auto" else "bf16" if bf16 else "fp16" if fp16
                     else "fp32")
            assign("bf16" if bf16 is not None else "fp16", "train.precision", value)
    if "adam_beta1" in data or "adam_beta2" in data:
        b1, b2 = data.get("adam_beta1", 0.9), data.get("adam_beta2", 0.999)
        assign("adam_beta1/adam_beta2", "optim.betas", [b1, b2])
    if data.get("push_to_hub") is True and "hub_model_id" not in data:
        fail("push_to_hub", "true without hub_model_id: sftctl's --push-to-hub takes the "
                            "repository id; set hub_model_id")
    for key, dest in (("datasets", "data.paths"), ("test_datasets", "data.val_paths")):
        if key in data:
            try:
                paths, fmt, split = _datasets(data[key], key)
            except Unmappable as e:
                fail(key, str(e))
                continue
            assign(key, dest, paths)
            if fmt is not None and key == "datasets":
                if _get(out, "data.format") is None:
                    _put(out, "data.format", fmt)
                    mapped.append((f"{key}[].type", "data.format"))
                plugins = out.setdefault("plugins", [])
                if isinstance(plugins, list) and fmt not in plugins:
                    plugins.append(fmt)
            if split is not None and key == "datasets":
                assign(f"{key}[].split", "data.split", split)
    if data.get("adapter") is not None:
        if data["adapter"] in ("lora",):
            plugins = out.setdefault("plugins", [])
            if isinstance(plugins, list) and "lora" not in plugins:
                plugins.append("lora")
            mapped.append(("adapter: lora", "plugins: [lora]"))
        else:
            fail("adapter", f"{data['adapter']!r}: only lora maps (the lora plugin; QLoRA is "
                            "--lora-load-in-4bit)")
    targets = data.get("lora_target_modules")
    if data.get("lora_target_linear") is True and targets is None:
        targets = "all-linear"
    if targets is not None:
        value = ",".join(targets) if isinstance(targets, list) else str(targets)
        assign("lora_target_modules" if "lora_target_modules" in data else
               "lora_target_linear", "options.lora.target_modules", value)
    return out, mapped, dropped


def apply_aliases(data: dict, source: str, log=None) -> dict:
    """``translate`` for a ``--config`` file (strict), with one notice naming each mapping."""
    if not isinstance(data, dict):
        return data
    out, mapped, _ = translate(data, source, strict=True)
    if mapped and log is not None:
        log.info("%s: TRL/Axolotl names mapped to sftctl's: %s", source,
                    ", ".join(f"{a} -> {k}" for a, k in mapped))
    return out
