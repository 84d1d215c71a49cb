"""Loading what is trained: the model source, the tokenizer, the model, and checks between them.

Design choices
- Plain functions that take the parts they need (the ``model:`` config section, a device, the
  tokenizer), so the trainer only wires them and a test can call each one alone.
- Weights load in fp32 whatever the checkpoint's dtype: the optimizer keeps fp32 master weights
  and the forward runs under autocast (``autocast_dtype``).
- On a GPU the weights load straight onto it (``device_map={"": device}``): no fp32 copy of the
  model in host memory, and weights a checkpoint lacks (``--allow-missing-weights``: a new head,
  a model built from its config) are initialised there (an 8B model: seconds on the GPU, minutes
  on the CPU). Every rank loads its own full copy, as before, so FSDP2 shards the same values
  (same seed, same device kind, same initialisation).
- The embedded default model is the dataset format's (``DatasetFormat.demo_base``): the core
  knows no particular model, and the format that tuned its defaults brings the base they were
  tuned for.
- ``compile_blocks`` compiles each transformer block's ``forward`` in place, not the module:
  hooks (FSDP2's all-gathers, DDP's, activation checkpointing's) stay eager around the compiled
  code and parameter names (hence checkpoints) do not change, as wrapping blocks in an
  ``OptimizedModule`` would make them. Blocks of one class share their compiled code.

Local path or hub id (``--model``, ``--tokenizer``, ``sftctl eval``'s CHECKPOINT and ``--base``):
``resolve_path_or_id`` decides before anything is loaded, so a typo in a path is "not found:
PATH" (exit 2), never a hub error about repo ids or connections.

1. A string naming something that exists (after ``~`` expansion) is that local path.
2. It is a path, reported as not found, when it starts with ``.``, ``/`` or ``~``, holds a
   backslash, ends with ``/``, has more than one ``/``, or has characters a hub id cannot
   have (the hub's form is ``NAME`` or ``ORG/NAME``, letters, digits, ``-``, ``_``, ``.``).
3. ``ORG/NAME`` whose ``ORG`` is an existing local directory (``models/nope`` next to a
   ``models/`` folder) is a path too: that is what a user with that folder means, and deciding
   it without the network gives the same answer online and offline. The message says so, for
   the rare user who meant the hub id (run from another directory, or use the hub's cache).
4. Anything else (``gpt2``, ``Qwen/Qwen2.5-0.5B``) is a hub id; when it cannot be fetched
   (offline, unknown) the hub's own message is shown.

Messages that would send the user elsewhere are rewritten: transformers' "install sentencepiece
or tiktoken" for a directory without tokenizer files names the directory and what is missing;
"pass trust_remote_code=True" names sftctl's ``--trust-remote-code`` and the ``auto_map`` entry
that needs it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from . import atomic

log = logging.getLogger("sftctl")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(resolved precision name, autocast dtype or None for fp32); ``auto``: bf16 on a GPU that
    has it, else fp16 on a GPU, fp32 on the CPU."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: bf16 is not supported by this GPU; use fp16")
    return precision, PRECISIONS[precision]


def model_source(name_or_path: str | None, fmt, run_dir: Path, strategy) -> tuple[str, str]:
    """(what ``from_pretrained`` loads, the base model recorded in summary.json). With no
    ``--model``, rank 0 builds the format's embedded base into ``run_dir/base`` (atomically)."""
    if name_or_path is None:
        if fmt.demo_base is None:
            raise ConfigError(f"model.name_or_path: format {fmt.name!r} (plugin {fmt.plugin!r}) "
                              "has no embedded demo model; pass --model PATH_OR_ID")
        base = Path(run_dir) / "base"
        if strategy.is_main:
            log.info("building the embedded base model of plugin %r in %s", fmt.plugin, base)
            with atomic.atomic_directory(base) as tmp:
                fmt.demo_base(tmp, 0)
        strategy.barrier()
        path = str(base.resolve())
        return path, path
    src = resolve_path_or_id(name_or_path, "model")
    p = Path(src)
    if p.is_absolute():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a Hugging Face model directory (no config.json)")
    return src, src


# the hub's repo-id form: NAME or ORG/NAME (huggingface_hub validates the same characters)
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")


def resolve_path_or_id(name: str, what: str) -> str:
    """The absolute path of an existing local ``name``, else ``name`` as a hub id; a string
    that reads as a path (the rules in the module docstring) and does not exist is a
    ``ModelError`` "<what> path not found: NAME". ``what``: "model", "tokenizer", ..."""
    p = Path(name).expanduser()
    if p.exists():
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or \
            not _HUB_ID.match(name):
        raise ModelError(f"{what} path not found: {name}")
    org = name.partition("/")[0]
    if "/" in name and Path(org).is_dir():
        raise ModelError(f"{what} path not found: {name} (read as a local path because the "
                         f"directory {org}/ exists here; ORG/NAME is looked up on the hub only "
                         "when ORG is not a local directory)")
    return name


# files a tokenizer's vocabulary lives in (tokenizers' JSON, sentencepiece, BPE, WordPiece,
# tiktoken); byte-level tokenizers need only tokenizer_config.json
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
               "vocab.json", "merges.txt", "vocab.txt")


def _tokenizer_files(d: Path) -> list[str]:
    return sorted(n.name for n in d.iterdir() if n.name in VOCAB_FILES or n.name ==
                  "tokenizer_config.json" or n.suffix in (".model", ".tiktoken"))


def check_tokenizer_dir(d: Path, what: str) -> None:
    """A local directory with no tokenizer file at all: say so (transformers would ask for
    sentencepiece or tiktoken, which would not help). ``what``: "the checkpoint", ..."""
    if d.is_dir() and not _tokenizer_files(d):
        raise ModelError(f"{what} {d} has no tokenizer files (none of tokenizer.json, "
                         "tokenizer_config.json, tokenizer.model, vocab.json/merges.txt, "
                         "vocab.txt); copy them from its base model (tokenizer.save_pretrained"
                         f"(\"{d}\"))" + (" or pass --tokenizer PATH_OR_ID" if what == "the model"
                                          else ""))


def remote_code_entries(src: str) -> list[str]:
    """``auto_map`` entries (custom classes) of a local model or tokenizer directory."""
    out = []
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(src) / name
        try:
            auto = json.loads(f.read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for cls, ref in auto.items():
            out.append(f"{name}: {cls} -> {ref}")
    return out


def explain_load_error(e: Exception, src: str, what: str, flag_hint: str) -> str | None:
    """A message for a failed ``from_pretrained`` of ``src`` whose own message would send the
    user the wrong way (custom code, a missing vocabulary), else None; ``flag_hint``: what
    the user can do about custom code in this command."""
    text = str(e)
    if "trust_remote_code" in text:
        local = Path(src).is_dir()
        entries = remote_code_entries(src) if local else []
        where = f"the directory {src}" if local else f"the hub repository {src}"
        return (f"the {what} {src} needs custom code from {where}"
                + (f" ({'; '.join(entries)})" if entries else "")
                + f"; {flag_hint}")
    if "sentencepiece or tiktoken" in text and Path(src).is_dir():
        d = Path(src)
        have = _tokenizer_files(d)
        return (f"cannot load the tokenizer of {d}: it has no vocabulary file (none of "
                f"{', '.join(VOCAB_FILES)}; it has {', '.join(have) or 'no tokenizer file'}); "
                "copy the tokenizer files of its base model into it")
    return None


REMOTE_CODE_HINT = ("sftctl does not run it by default: review that code, then pass "
                    "--trust-remote-code (YAML: model: trust_remote_code: true) to run it")


def load_tokenizer(src: str, model_cfg):
    """The tokenizer, right-padded, with EOS required and a pad token guaranteed. ``src``: a
    resolved model source, or ``--tokenizer`` as given (resolved here)."""
    from transformers import AutoTokenizer

    src = resolve_path_or_id(src, "tokenizer")
    check_tokenizer_dir(Path(src), "--tokenizer" if model_cfg.tokenizer else "the model")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code,
                                            revision=model_cfg.revision)
    except Exception as e:
        raise ModelError(explain_load_error(e, src, "tokenizer", REMOTE_CODE_HINT) or
                         f"cannot load the tokenizer {src!r}: {type(e).__name__}: "
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


def load_model(src: str, model_cfg, tokenizer, device: torch.device, *,
               resize_embeddings: bool = False, load_options: dict | None = None
               ) -> torch.nn.Module:
    """The causal LM in fp32 on ``device``, checked against the tokenizer, training-ready
    (no KV cache, activation checkpointing when asked). ``resize_embeddings``: plugins added
    tokens to the tokenizer; grow the embeddings (and an untied head) to match.
    ``load_options``: ``from_pretrained`` keywords plugins asked for (``dtype``,
    ``quantization_config``, ...; ``PluginManager.model_load_options``)."""
    from transformers import AutoModelForCausalLM

    kw = dict(trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
              dtype=torch.float32)
    if device.type == "cuda":
        kw["device_map"] = {"": device}  # load (and initialise missing weights) on the GPU
    kw.update(load_options or {})
    if model_cfg.attn_implementation:
        kw["attn_implementation"] = model_cfg.attn_implementation
    try:
        model, report = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True, **kw)
    except Exception as e:
        raise ModelError(explain_load_error(e, src, "model", REMOTE_CODE_HINT) or
                         f"cannot load the model {src!r}: {type(e).__name__}: "
                         f"{str(e)[:400]}") from None
    _check_load_report(src, report, model_cfg.allow_missing_weights)
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb and resize_embeddings:
        # new rows start at the mean of the old ones (transformers' mean_resizing)
        model.resize_token_embeddings(len(tokenizer))
        log.info("embeddings resized from %d to %d rows for the tokens plugins added", emb,
                 len(tokenizer))
    elif len(tokenizer) > emb:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{emb} rows")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and \
            model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        # transformers 5 renamed it; non-reentrant checkpointing works with any input
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # loaded onto the GPU already (and a quantized model refuses .to)
    return model if "device_map" in kw else model.to(device)


def _check_load_report(src: str, report: dict, allowed: bool) -> None:
    """transformers only logs weights missing from a checkpoint (they are randomly initialised)
    and weights it ignores: a truncated or mismatched base would train silently. An error
    unless ``--allow-missing-weights`` (then a warning)."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint (randomly initialised)"),
                      ("unexpected_keys", "in the checkpoint but not in the model (ignored)"),
                      ("mismatched_keys", "of another shape in the checkpoint (re-initialised)")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in report.get(key) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                            else "")
            problems.append(f"{len(names)} weight(s) {what}: {shown}")
    if not problems:
        return
    if allowed:
        log.warning("model %s: %s (--allow-missing-weights)", src, "; ".join(problems))
        return
    raise ModelError(f"model {src}: " + "; ".join(problems) + ". Pass --allow-missing-weights "
                     "if that is intended (e.g. a new head), else check the model files")


def resolve_compile(value, device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """``model.compile`` as a bool. ``auto`` is on with CUDA for a transformers model, also
    when a plugin wrapped it in a peft model (LoRA: measured 1.70x the tokens/s of PEFT + HF on
    an H200, bench/results/lora_*); off on the CPU (compiling costs more than it saves on the
    small CPU models), for a quantized base (QLoRA's 4-bit layers: not measured compiled) and
    for any other wrapper (not measured compiled, so not compiled unless asked)."""
    if value == "auto":
        if device.type != "cuda":
            return False
        from transformers import PreTrainedModel

        if model is None or isinstance(model, PreTrainedModel):
            return True
        inner = getattr(getattr(model, "base_model", None), "model", None)  # PeftModel
        return (type(model).__module__.startswith("peft.") and isinstance(inner, PreTrainedModel)
                and getattr(inner.config, "quantization_config", None) is None)
    return bool(value)


def has_blocks(model: torch.nn.Module) -> bool:
    """Whether the model names transformer block classes that ``compile_blocks`` compiles one by
    one (else it compiles the whole forward)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return any(type(m).__name__ in names for m in model.modules() if m is not model)


def compile_blocks(model: torch.nn.Module) -> str:
    """``torch.compile`` the ``forward`` of each transformer block in place (see the module
    docstring); returns what was compiled, for the log and the summary."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        model.forward = torch.compile(model.forward)
        return f"the whole model's forward ({type(model).__name__}; it names no block class)"
    for block in blocks:
        block.forward = torch.compile(block.forward)
    kinds = sorted({type(b).__name__ for b in blocks})
    return f"{len(blocks)} blocks ({', '.join(kinds)}), forward of each"


def check_lengths(model_config, longest: int, what: str) -> None:
    """A sequence longer than the model's positions would fail deep inside the model (learned
    positions) or silently degrade (RoPE): refuse it before training."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise ConfigError(f"data.max_seq_len: {what} has {longest} tokens but the model supports "
                          f"{limit} positions (max_position_embeddings); lower --max-seq-len to "
                          f"{limit} or less")
