"""Built-in plugin ``lora``: LoRA (and rsLoRA, DoRA, QLoRA) adapters through the ``peft`` library.

``sftctl train --plugin lora`` trains low-rank adapters instead of the whole model; ``peft`` is an
optional dependency (``pip install 'sftctl[lora]'``), imported only when the plugin is enabled.

Design choices
- The plugin only uses hooks any plugin has: ``sftctl_prepare_model`` wraps the loaded model in a
  ``PeftModel`` (so ``--compile``, DDP/FSDP2, the optimizer and ``--resume`` see the adapted
  model: frozen base parameters never reach the optimizer, and the frozen output layer gets no
  weight gradient, the fused loss only producing the gradient of the logits);
  ``sftctl_save_model`` writes the adapter and hands the trainer the merged model for
  ``OUTPUT_DIR/model``; ``sftctl_configure`` rejects bad options before any data or model is
  loaded; ``sftctl_config_defaults`` gives the embedded demo run its adapter rank.
- Default targets: every ``nn.Linear`` inside the transformer blocks (the classes the model
  names in ``_no_split_modules``), never the output layer or anything outside the blocks. They
  are passed to peft as the blocks' leaf names (``q_proj``, ``down_proj``, ...) so
  ``adapter_config.json`` stays readable; where such a leaf name also exists outside the blocks
  the full module names are used instead.
- Outputs: ``OUTPUT_DIR/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors`` and
  the tokenizer, for ``PeftModel.from_pretrained(base, dir)``) and the merged weights as the
  standard checkpoint ``OUTPUT_DIR/model``, both through ``atomic_directory``, so the post-train
  benchmarks compare the merged model with the base as after full fine-tuning. One process or
  DDP merges the live model in place (training is over; no second copy of the weights); FSDP
  gathers the full weights on rank 0's CPU, and they are loaded by assignment into a skeleton
  built on the meta device, wrapped with the same adapter config and merged there.
- Resumable checkpoints hold the ``PeftModel``'s state dict (adapter and base weights, as
  trained), so ``--resume`` is exact like a full fine-tune. Resuming a LoRA checkpoint without
  ``--plugin lora`` or the reverse is refused in ``sftctl_configure`` (it is a different model).
- QLoRA (``--lora-load-in-4bit``): the base is reloaded 4-bit NF4 through bitsandbytes on the
  GPU; bitsandbytes is looked up with ``importlib.util.find_spec`` and imported only on that
  path, never on the CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

from sftctl import ConfigError, ConfigOption, hookimpl

log = logging.getLogger("sftctl")

NAME = "lora"
INSTALL = "pip install 'sftctl[lora]' (or: pip install peft)"

# LoRA on the embedded demo model (``sftctl train --plugin alpaca --plugin lora``): rank 16 of
# its 96-wide blocks. The full fine-tune's lr (2e-3) is kept: 1e-2 stalled at loss 6.2 where 2e-3
# reached 5.8 in 300 steps (README, "LoRA and other adapters").
EMBEDDED_DEFAULTS = {"options": {"lora.r": 16, "lora.alpha": 32.0}}


def enabled(config) -> bool:
    return NAME in (config.plugins or [])


def _list(value) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [s.strip() for s in items if s and s.strip()]


# ------------------------------------------------------------------------------------- options


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("lora.r", int, 8, "LoRA rank (enabled with --plugin lora)."))
    register(ConfigOption("lora.alpha", float, 16.0,
                          "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with "
                          "--lora-rslora)."))
    register(ConfigOption("lora.dropout", float, 0.0, "Dropout on the LoRA branch's input."))
    register(ConfigOption("lora.target_modules", str, None,
                          "Comma-separated module names (or peft's 'all-linear') to adapt "
                          "(default: every linear layer of the transformer blocks, not the "
                          "output layer)."))
    register(ConfigOption("lora.modules_to_save", str, None,
                          "Comma-separated modules trained in full next to the adapters "
                          "(e.g. lm_head,embed_tokens)."))
    register(ConfigOption("lora.rslora", bool, False,
                          "Rank-stabilized LoRA: scale by alpha/sqrt(r)."))
    register(ConfigOption("lora.dora", bool, False,
                          "DoRA: weight-decomposed LoRA (a trained magnitude per output)."))
    register(ConfigOption("lora.load_in_4bit", bool, False,
                          "QLoRA: load the base 4-bit NF4 with bitsandbytes (CUDA only)."))


@hookimpl
def sftctl_config_defaults(plugins, data_format, embedded):
    if NAME in plugins and embedded and data_format == "alpaca":
        return copy.deepcopy(EMBEDDED_DEFAULTS)
    return None


@hookimpl
def sftctl_configure(config, pm):
    _check_resume(config)
    if not enabled(config):
        return
    o = config.options
    if o["lora.r"] < 1:
        raise ConfigError(f"options.lora.r (--lora-r): the rank must be at least 1, got "
                          f"{o['lora.r']}")
    if not o["lora.alpha"] > 0:
        raise ConfigError(f"options.lora.alpha (--lora-alpha): must be positive, got "
                          f"{o['lora.alpha']}")
    if not 0.0 <= o["lora.dropout"] < 1.0:
        raise ConfigError(f"options.lora.dropout (--lora-dropout): must be in [0, 1), got "
                          f"{o['lora.dropout']}")
    if o["lora.target_modules"] is not None and not _list(o["lora.target_modules"]):
        raise ConfigError("options.lora.target_modules (--lora-target-modules): empty; give "
                          "module names or leave it unset for every linear layer of the blocks")
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"--plugin lora needs the peft library, which is not installed: "
                          f"{INSTALL}")
    if o["lora.load_in_4bit"]:
        _check_4bit(config)


def _check_4bit(config) -> None:
    import torch

    where = "options.lora.load_in_4bit (--lora-load-in-4bit)"
    if config.train.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError(f"{where}: 4-bit QLoRA runs on a CUDA GPU only (bitsandbytes); this "
                          f"run is on the CPU (--device {config.train.device}). Drop the flag "
                          "to train LoRA on full-precision weights")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}: needs the bitsandbytes library: pip install bitsandbytes")
    if config.train.strategy == "fsdp":
        raise ConfigError(f"{where}: not supported with --strategy fsdp (4-bit weights are not "
                          "sharded here); use ddp")


def _check_resume(config) -> None:
    """A LoRA checkpoint is another model than a full fine-tune's: refuse mixing them here,
    before data and model are loaded (called for every run: the plugin is always loaded)."""
    spec = config.train.resume
    if not spec:
        return
    import yaml

    from sftctl.training.checkpoint import CONFIG, resolve_resume

    try:
        info = resolve_resume(spec, config.train.output_dir)
    except ConfigError:
        return  # the checkpointer reports a bad --resume itself
    if info is None:
        return
    try:
        saved = yaml.safe_load((Path(info.path) / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        return
    had = NAME in (saved.get("plugins") or [])
    if had and not enabled(config):
        raise ConfigError(f"train.resume: {info.path} is a LoRA checkpoint (trained with --plugin "
                          "lora); resume it with --plugin lora and the same --lora-* options")
    if enabled(config) and not had:
        raise ConfigError(f"train.resume: {info.path} is a full fine-tune checkpoint (no "
                          "--plugin lora); resuming it with --plugin lora would be another "
                          "model. Resume without --plugin lora, or start a new LoRA run "
                          "(--model that checkpoint's base)")


# --------------------------------------------------------------------------------------- model


def block_linear_names(model) -> list[str]:
    """The default targets: leaf names of the ``nn.Linear`` modules inside the transformer
    blocks (full names where a leaf name also occurs outside them)."""
    import torch

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    inside, outside = set(), set()
    blocks = [(n, m) for n, m in model.named_modules()
              if m is not model and type(m).__name__ in block_classes]
    in_block = set()
    for bname, block in blocks:
        for n, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                in_block.add(f"{bname}.{n}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            (inside if n in in_block else outside).add(n)
    if not blocks:
        raise ConfigError(f"options.lora.target_modules (--lora-target-modules): "
                          f"{type(model).__name__} names no transformer block class "
                          "(_no_split_modules), so the default targets are unknown; name the "
                          "modules to adapt")
    leaves = {n.rsplit(".", 1)[-1] for n in inside}
    if any(n.rsplit(".", 1)[-1] in leaves for n in outside):
        return sorted(inside)
    return sorted(leaves)


def lora_config(options, model):
    from peft import LoraConfig

    targets = _list(options["lora.target_modules"])
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif not targets:
        targets = block_linear_names(model)
    return LoraConfig(r=options["lora.r"], lora_alpha=options["lora.alpha"],
                      lora_dropout=options["lora.dropout"], target_modules=targets,
                      modules_to_save=_list(options["lora.modules_to_save"]) or None,
                      use_rslora=options["lora.rslora"], use_dora=options["lora.dora"],
                      bias="none", task_type="CAUSAL_LM")


def _linear_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


@hookimpl
def sftctl_prepare_model(model, config):
    if not enabled(config):
        return None
    from peft import get_peft_model

    o = config.options
    if o["lora.load_in_4bit"]:
        model = _load_4bit(model, config)
    cfg = lora_config(o, model)
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        if "not found in the base model" in str(e) or "not find" in str(e):
            raise ConfigError(f"options.lora.target_modules (--lora-target-modules): "
                              f"{o['lora.target_modules']!r} matches no module of "
                              f"{type(model).__name__}; its linear layers are named "
                              f"{', '.join(_linear_names(model))}") from None
        raise ConfigError(f"--plugin lora: peft refused the adapter config: {e}") from None
    names = dict(peft_model.named_modules())
    for want in _list(o["lora.modules_to_save"]):
        if not any(k == want or k.endswith("." + want) for k, m in names.items()
                   if type(m).__name__ == "ModulesToSaveWrapper"):
            raise ConfigError(f"options.lora.modules_to_save (--lora-modules-to-save): {want!r} "
                              f"matches no module of {type(model).__name__}")
    adapted = sorted(k for k, m in names.items() if hasattr(m, "lora_A") and
                     "default" in getattr(m, "lora_A", {}))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("lora: r=%d alpha=%g dropout=%g%s%s on %d modules (%s); %d of %d parameters "
             "trainable (%.2f%%)", cfg.r, cfg.lora_alpha, cfg.lora_dropout,
             ", rsLoRA" if cfg.use_rslora else "", ", DoRA" if cfg.use_dora else "",
             len(adapted), ", ".join(sorted({k.rsplit(".", 1)[-1] for k in adapted})),
             trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def _load_4bit(model, config):
    """QLoRA: the same base again, 4-bit NF4 on the model's GPU (bitsandbytes, CUDA only)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = next(model.parameters()).device
    if device.type != "cuda":  # sftctl_configure checked the config; the device decides
        raise ConfigError("options.lora.load_in_4bit (--lora-load-in-4bit): the model is on "
                          f"{device}; 4-bit QLoRA needs a CUDA GPU")
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    src = model.config._name_or_path
    rows = model.get_input_embeddings().weight.shape[0]
    pad = model.config.pad_token_id
    del model
    torch.cuda.empty_cache()
    q = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute),
        dtype=torch.float32, device_map={"": device},
        trust_remote_code=config.model.trust_remote_code, revision=config.model.revision)
    if q.get_input_embeddings().weight.shape[0] != rows:  # tokens added by plugins
        q.resize_token_embeddings(rows)
    q.config.pad_token_id = pad
    q = prepare_model_for_kbit_training(
        q, use_gradient_checkpointing=config.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    q.config.use_cache = False
    log.info("lora: base reloaded 4-bit NF4 (compute %s) on %s", compute, device)
    return q


# ---------------------------------------------------------------------------------------- save


@hookimpl
def sftctl_save_model(run, model, state_dict):
    if not enabled(run.config):
        return None
    from sftctl.training.atomic import atomic_directory

    if not hasattr(model, "peft_config"):
        raise RuntimeError("lora: the final model is not a peft model (another plugin replaced "
                           "it before the lora plugin saw it)")
    out = Path(run.output_dir) / "adapter"
    with atomic_directory(out) as tmp:
        # state_dict: FSDP's gathered weights; peft keeps only the adapter's entries
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True,
                              save_embedding_layers=False)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(tmp)
    log.info("lora: adapter saved to %s", out)
    merged = _merged(model, state_dict)
    log.info("lora: adapter merged into the base for %s", Path(run.output_dir) / "model")
    return merged


def _merged(model, state_dict):
    """The base model with the adapter merged in (a plain transformers model)."""
    if state_dict is None:  # the live weights are complete: merge in place, no second copy
        return model.merge_and_unload(safe_merge=True)
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    skeleton = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    # assign: the gathered CPU tensors become the parameters (no copy); tied names share one
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    merged = skeleton.merge_and_unload(safe_merge=True)
    merged.tie_weights()
    return merged
