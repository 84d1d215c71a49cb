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
  loaded; ``sftctl_config_defaults`` gives the embedded demo run its defaults.
- The embedded demo (``--plugin alpaca --plugin lora``, no ``--model``): its base is randomly
  initialized, so its token embeddings (tied to the output layer) mean nothing, and adapters
  on the blocks alone cannot fix a frozen random input and output map. The defaults train the
  embeddings in full (``modules_to_save``) next to rank-16 adapters, at lr 5e-3; the run log
  says so. A pretrained base (``--model``) gets none of this.
- Tied embeddings in ``modules_to_save``: peft's ``ensure_weight_tying`` keeps one trained
  tensor for the embeddings and the head, so the merged checkpoint is still a tied model.
- Frozen base dtype (``--lora-base-dtype``, default auto): on a GPU under bf16/fp16 the frozen
  base weights are held in that dtype (they are only read: half the memory, no per-step cast
  under autocast), adapters and ``modules_to_save`` stay fp32 (master weights). fp32 on the
  CPU and with FSDP2 (which shards one dtype per group).
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
- A merged copy during training (``merged_copy``, for ``--benchmark-every``'s step models;
  one process or DDP, rank 0): the same skeleton route as the FSDP merge, fed the live state
  dict on the CPU (a tensor already on the CPU is shared, not copied; tied tensors stay one)
  and merged with peft's ``safe_merge``, which writes each merged weight into a new tensor: the
  training weights are never written, no ``deepcopy`` of the model (its gradients, hooks or
  wrappers) is made, and peft's own merge handles rsLoRA's scaling and DoRA's magnitudes. On a
  GPU the extra memory is one CPU copy of the weights, none on the device. QLoRA reuses the
  final save's full-precision merge (the base reloaded on the CPU, the adapter copied in).
- Resumable checkpoints hold the ``PeftModel``'s state dict (adapter and base weights, as
  trained), so ``--resume`` is exact like a full fine-tune. Resuming a LoRA checkpoint without
  ``--plugin lora`` or the reverse is refused in ``sftctl_configure`` (it is a different model).
- QLoRA (``--lora-load-in-4bit``): the base is reloaded 4-bit NF4 through bitsandbytes on the
  GPU; bitsandbytes is looked up with ``importlib.util.find_spec`` and imported only on that
  path, never on the CPU (peft itself imports it while building LoRA layers whenever it is
  installed; that is outside sftctl). The merged ``OUTPUT_DIR/model`` of a QLoRA run is the
  adapter merged into the base reloaded in full precision on the CPU, not into the NF4 weights
  (a standard checkpoint, as the QLoRA paper's users merge).
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

# LoRA on the embedded demo model (``sftctl train --plugin alpaca --plugin lora``). That base is
# randomly initialized: its token embeddings (tied to the output layer) carry no information, and
# adapters on the blocks alone cannot make up for a frozen random input and output map (300
# steps: loss 6.99 -> 5.82 against 1.64 for full fine-tuning). So the embeddings train in full
# (modules_to_save, kept tied to the head) next to rank-16 adapters. Measured on 600-step runs
# side by side (held-out loss; full fine-tuning 1.11): lr 2e-3 1.52, lr 5e-3 1.35, r=32 alpha=64
# lr 3e-3 1.45; lr 5e-3 was kept (README, "LoRA and other adapters").
EMBEDDED_DEFAULTS = {"options": {"lora.r": 16, "lora.alpha": 32.0,
                                 "lora.modules_to_save": "embed_tokens"},
                     "optim": {"lr": 5e-3}}


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
    register(ConfigOption("lora.base_dtype", str, "auto",
                          "dtype of the frozen base weights: auto (the autocast dtype, bf16 or "
                          "fp16, when training on a GPU in that precision without FSDP; fp32 "
                          "otherwise), fp32, bf16 or fp16. Adapters and modules_to_save stay "
                          "fp32.", choices=("auto", "fp32", "bf16", "fp16")))


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
    if o["lora.base_dtype"] not in ("auto", "fp32") and config.train.strategy == "fsdp":
        raise ConfigError(f"options.lora.base_dtype (--lora-base-dtype): {o['lora.base_dtype']} "
                          "is not supported with --strategy fsdp (FSDP2 shards parameters of "
                          "one dtype); use auto or fp32")
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
    save = _list(options["lora.modules_to_save"]) or None
    extra = {}
    if _ties_saved_embedding(model, save):  # older peft has no such field: pass it only here
        extra["ensure_weight_tying"] = True
    return LoraConfig(r=options["lora.r"], lora_alpha=options["lora.alpha"],
                      lora_dropout=options["lora.dropout"], target_modules=targets,
                      modules_to_save=save, use_rslora=options["lora.rslora"],
                      use_dora=options["lora.dora"], bias="none", task_type="CAUSAL_LM",
                      **extra)


def _ties_saved_embedding(model, save) -> bool:
    """True when the model ties its output layer to the input embeddings and one of them is
    trained in full (``modules_to_save``): peft then keeps the two trained copies one tensor,
    so the merged checkpoint is still a tied model (else the head would stay at the base's
    weights while the embeddings train, and the saved tied config would be wrong)."""
    if not save or not getattr(model.config, "tie_word_embeddings", False):
        return False
    names = {n for n, m in model.named_modules()
             if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
    return any(n == w or n.endswith("." + w) for n in names for w in save)


def _linear_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


@hookimpl
def sftctl_model_load_options(config, device):
    """Load the base the way it will train, so no fp32 copy of it is ever made (an 8B base in
    fp32 is 32 GB: more than many GPUs that fit it in 4 bit or bf16): 4-bit NF4 for QLoRA, the
    frozen dtype (``--lora-base-dtype``) otherwise. Not when ``modules_to_save`` is set: those
    modules train from the checkpoint's full-precision values, so the base loads in fp32 and
    only its frozen weights are cast (``_cast_frozen``)."""
    if not enabled(config):
        return None
    if config.options["lora.load_in_4bit"]:
        if device.type != "cuda":
            raise ConfigError("options.lora.load_in_4bit (--lora-load-in-4bit): the model is "
                              f"on {device}; 4-bit QLoRA needs a CUDA GPU")
        return {"quantization_config": _bnb_config()}
    if _list(config.options["lora.modules_to_save"]):
        return None
    dtype = _frozen_dtype(config, device)
    return None if dtype is None else {"dtype": dtype}


def _bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def _frozen_dtype(config, device):
    """The dtype the frozen base weights are held in (``--lora-base-dtype``), None for fp32."""
    from sftctl.training.model import PRECISIONS, autocast_dtype

    want = config.options["lora.base_dtype"]
    if want == "auto":
        if device.type != "cuda" or config.train.strategy == "fsdp" or \
                config.options["lora.load_in_4bit"]:
            # the CPU computes in fp32; FSDP2 shards one dtype per group; QLoRA's base is
            # already 4-bit, its other weights as peft's kbit preparation left them
            return None
        return autocast_dtype(config.train.precision, device)[1]
    return PRECISIONS[want]


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
    base_dtype = _cast_frozen(peft_model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("lora: r=%d alpha=%g dropout=%g%s%s on %d modules (%s); %d of %d parameters "
             "trainable (%.2f%%)", cfg.r, cfg.lora_alpha, cfg.lora_dropout,
             ", rsLoRA" if cfg.use_rslora else "", ", DoRA" if cfg.use_dora else "",
             len(adapted), ", ".join(sorted({k.rsplit(".", 1)[-1] for k in adapted})),
             trainable, total, 100.0 * trainable / max(total, 1))
    saved = _list(o["lora.modules_to_save"])
    if saved:
        log.info("lora: trained in full next to the adapters (modules_to_save): %s%s",
                 ", ".join(saved), " (tied to the output layer: one trained tensor)"
                 if getattr(cfg, "ensure_weight_tying", False) else "")
    if config.model.name_or_path is None and saved:
        log.info("lora: the embedded demo base is randomly initialized, so its token embeddings "
                 "mean nothing yet: the plugin's embedded defaults train them (and the tied "
                 "output layer) with the adapters; a pretrained base (--model) needs no such "
                 "thing (--lora-modules-to-save '' turns it off)")
    if base_dtype is not None:
        log.info("lora: frozen base weights held in %s (--lora-base-dtype); adapters and "
                 "modules_to_save train in fp32", str(base_dtype).replace("torch.", ""))
    return peft_model


def _cast_frozen(model, config):
    """Hold the frozen base weights in the training precision (see ``--lora-base-dtype``):
    they are only read, so fp32 copies would cost twice the memory and a cast on every
    forward under autocast; the weights that train (adapters, ``modules_to_save``) are fp32
    master weights whatever dtype the base loaded in. Returns the frozen dtype, or None (fp32)."""
    import torch

    dtype = _frozen_dtype(config, next(model.parameters()).device)
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        elif dtype is not None and not p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return dtype


def _load_4bit(model, config):
    """QLoRA: the base 4-bit NF4 on the model's GPU (bitsandbytes, CUDA only), prepared for
    k-bit training. Loaded so by ``sftctl_model_load_options``; a model another plugin
    replaced is reloaded 4-bit from its source."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    if device.type != "cuda":  # sftctl_configure checked the config; the device decides
        raise ConfigError("options.lora.load_in_4bit (--lora-load-in-4bit): the model is on "
                          f"{device}; 4-bit QLoRA needs a CUDA GPU")
    compute = _bnb_config().bnb_4bit_compute_dtype
    if getattr(model.config, "quantization_config", None) is not None:
        q = model  # loaded 4-bit straight away (sftctl_model_load_options)
    else:  # another plugin's model: the same base again, 4-bit
        src = model.config._name_or_path
        rows = model.get_input_embeddings().weight.shape[0]
        pad = model.config.pad_token_id
        del model
        torch.cuda.empty_cache()
        q = AutoModelForCausalLM.from_pretrained(
            src, quantization_config=_bnb_config(), dtype=torch.float32,
            device_map={"": device.index if device.index is not None
                        else torch.cuda.current_device()},
            trust_remote_code=config.model.trust_remote_code, revision=config.model.revision)
        if q.get_input_embeddings().weight.shape[0] != rows:  # tokens added by plugins
            q.resize_token_embeddings(rows)
        q.config.pad_token_id = pad
    q = prepare_model_for_kbit_training(
        q, use_gradient_checkpointing=config.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    q.config.use_cache = False
    log.info("lora: base 4-bit NF4 (compute %s) on %s", compute, device)
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
    if run.config.options["lora.load_in_4bit"]:
        merged = _merged_full_precision(model, run.config)
    else:
        merged = _merged(model, state_dict)
    log.info("lora: adapter merged into the base for %s", Path(run.output_dir) / "model")
    return merged


def _merged(model, state_dict):
    """The base model with the adapter merged in (a plain transformers model). ``state_dict``
    None: the live weights are complete, merged in place (training is over: no second copy);
    else the weights of ``state_dict`` are merged in a skeleton of the model, ``model`` itself
    is neither read for weights nor written."""
    if state_dict is None:
        return model.merge_and_unload(safe_merge=True)
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # (from_config writes dtype into the config: a copy)
        base = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
    skeleton = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    # assign: the gathered CPU tensors become the parameters (no copy); tied names share one
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    merged = skeleton.merge_and_unload(safe_merge=True)
    merged.tie_weights()
    return merged


def merged_copy(model, config):
    """The adapter merged into its base as a plain transformers model on the CPU, while
    training goes on: ``model`` (the live peft model, unwrapped from DDP) is left exactly as it
    was (see the module docstring). Used by the ``evals`` plugin for ``--benchmark-every``."""
    import torch

    if not hasattr(model, "peft_config"):
        raise RuntimeError("lora: the model being trained is not a peft model (another plugin "
                           "replaced it); cannot merge a copy of it")
    if config.options["lora.load_in_4bit"]:
        return _merged_full_precision(model, config)
    cpu: dict[tuple, torch.Tensor] = {}  # one CPU tensor per live storage: tied ones stay one

    def on_cpu(t):
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
               tuple(t.shape), tuple(t.stride()))
        if key not in cpu:
            cpu[key] = t.to("cpu")
        return cpu[key]

    state = {k: on_cpu(v) for k, v in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        merged = _merged(model, state)
        # buffers outside the state dict (rotary inv_freq, ...) are still on the meta device
        # in the skeleton: copies of the live ones, so the copy runs like the model it is
        live = dict(model.get_base_model().named_buffers())
        for name, buf in list(merged.named_buffers()):
            if buf.is_meta and name in live:
                mod, _, leaf = name.rpartition(".")
                merged.get_submodule(mod)._buffers[leaf] = live[name].detach().to("cpu",
                                                                                   copy=True)
    left = [n for n, t in [*merged.named_parameters(), *merged.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"lora: the merged copy has tensors without data: {left[:5]}")
    return merged


def _merged_full_precision(model, config):
    """QLoRA: the adapter merged into the base reloaded in full precision on the CPU. The NF4
    weights are a training-time approximation of the base; merging into them would write a
    quantized checkpoint that plain transformers/vLLM users cannot load as a standard model."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    src = model.config._name_or_path
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                trust_remote_code=config.model.trust_remote_code,
                                                revision=config.model.revision)
    rows = model.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != rows:  # tokens added by plugins
        base.resize_token_embeddings(rows)
    base.config.pad_token_id = model.config.pad_token_id
    full = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    adapter = {k: v.detach().to("cpu", torch.float32)
               for k, v in get_peft_model_state_dict(model).items()}
    res = set_peft_model_state_dict(full, adapter)
    if getattr(res, "unexpected_keys", None):
        raise RuntimeError(f"lora: the 4-bit run's adapter does not fit the full-precision base: "
                           f"unexpected {sorted(res.unexpected_keys)[:5]}")
    log.info("lora: QLoRA adapter merged into the full-precision base %s (on the CPU)", src)
    return full.merge_and_unload(safe_merge=True)
