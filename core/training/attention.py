"""Packed attention without a mask: variable-length ("varlen") attention over packed rows.

Design choices
- transformers 5 routes every attention call of a model through its ``AttentionInterface``; sftctl
  registers one more function there, ``sftctl_varlen``, and sets it on the model for packed
  training. Because no mask function is registered under that name, transformers builds no mask at
  all (neither the block-diagonal mask it derives from ``position_ids`` for sdpa, which costs a
  device sync and sends sdpa to a masked kernel, nor anything else). The documents of a packed
  micro-batch arrive instead as ``cu_seq_lens_q/k`` (int32 cumulative lengths over the flattened
  ``B * T`` tokens: every document, and each row's padding tail as a segment of its own) and
  ``max_length_q/k`` (a host int), computed by ``collate`` on the host (no device sync) and passed
  as forward kwargs, which transformers hands through to the attention function.
- The kernel is chosen once, at setup, from what is installed and what the model needs (dtype,
  head size, sliding windows, attention logit softcapping, dropout):
  1. ``flash_attn.flash_attn_varlen_func`` (the flash-attn package) when it is importable: causal,
     windows, softcap, GQA and dropout;
  2. PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (flash kernels shipped with torch):
     causal, windows (torch >= 2.11), GQA (``enable_gqa`` where the signature has it, else the
     key/value heads are repeated); no softcap, no dropout;
  3. otherwise transformers' own path for the model's ``--attn-implementation``; on CUDA that is
     a counted fallback with its reason (log, summary.json ``fallbacks``).
  On the CPU the default stays transformers' path (sdpa with the block mask it derives from the
  position ids); ``--packed-attention varlen`` forces the varlen function there, which then runs
  its reference kernel: exact attention per document (fp32 softmax, causal, window, softcap),
  used by the tests to check the plumbing against documents run one by one.
- A setup probe runs the model once on two packed documents and counts the calls of the function:
  a model that does not dispatch through ``AttentionInterface`` (or not in every layer) is a
  fallback, never a silent full-row attention.
- Padded (unpacked) rows take the same function on CUDA, with the attention mask dropped and no
  segments (``Batch.model_inputs``), which spares the mask and the device sync transformers'
  sdpa path spends checking it; without ``cu_seq_lens_q`` the function attends causally within
  each row, exact for right-padded rows (sftctl pads on the right: real tokens only see earlier
  real tokens, and padding carries no loss). Such rows need no varlen kernel: where cuDNN's
  fused attention runs (a setup probe: forward and backward at the model's head counts and size
  on the run's GPU) they go to SDPA pinned to cuDNN, with native GQA; one layer's fwd+bwd at 4 x
  2048 tokens, 32/8 heads on an H200 (bench/bench_attention.py): head size 64: cuDNN 1.09 ms,
  SDPA flash 1.32, torch varlen_attn 1.90; head size 128: 1.45 / 2.09 / 2.51. Otherwise (or with
  softcap, windows or dropout, which that path lacks; the reason is recorded) they take the
  varlen kernel, one segment per row. A missing kernel is not a fallback for padded rows (sdpa
  serves them well); for packed rows it is.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import torch

from ..errors import ConfigError, TrainingError

log = logging.getLogger("sftctl")

NAME = "sftctl_varlen"
KERNELS = {
    "flash_attn": "flash-attn flash_attn_varlen_func",
    "torch": "torch.nn.attention.varlen.varlen_attn",
    "reference": "exact attention per document (sftctl's reference, fp32 softmax)",
}

# the kernel the registered function runs (set by ``choose``; one training per process);
# "rows": what unpacked rows (no cu_seq_lens) take on the GPU: "cudnn" or the varlen kernel
_ACTIVE = {"kernel": "reference", "fn": None, "params": frozenset(), "rows": None}
ROWS_KERNELS = {"cudnn": "SDPA with cuDNN attention, causal per row"}
CALLS: dict[str, int] = {}  # kernel -> calls (tests and the setup probe read it)


@dataclasses.dataclass
class AttentionChoice:
    """What packed rows use: ``varlen`` True means the ``sftctl_varlen`` function with
    ``kernel``; False means transformers' own ``implementation``."""

    varlen: bool
    implementation: str
    kernel: str | None = None
    reason: str | None = None      # why not varlen (a fallback when the device wanted it)
    fallback: bool = False
    rows_kernel: str | None = None  # unpacked rows: "cudnn", or None (the varlen kernel)
    rows_reason: str | None = None  # why not cuDNN for unpacked rows (on a GPU)

    def describe(self) -> str:
        if self.varlen:
            rows = f"; unpacked rows: {ROWS_KERNELS[self.rows_kernel]}" if self.rows_kernel \
                else ""
            return f"{NAME} ({KERNELS[self.kernel]}{rows})"
        impl = self.implementation
        what = {"sdpa": "sdpa with the block mask transformers derives from position_ids",
                "eager": "eager with the block mask transformers derives from position_ids",
                "flex_attention": "flex_attention with transformers' document block mask"}
        return what.get(impl, f"{impl} (transformers' packed handling)")

    def to_json(self) -> dict:
        return {"varlen": self.varlen, "implementation": NAME if self.varlen else
                self.implementation, "kernel": KERNELS.get(self.kernel) if self.varlen else None,
                "rows_kernel": ROWS_KERNELS.get(self.rows_kernel) if self.varlen else None,
                "rows_reason": self.rows_reason if self.varlen else None,
                "description": self.describe(), "reason": self.reason}


# --------------------------------------------------------------------------- availability

def flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def _params(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def model_needs(config, amp_dtype) -> dict:
    """Attention features of a model config that a kernel must support."""
    cfg = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // heads if heads and getattr(cfg, "hidden_size", None) else None)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    return {"softcap": getattr(cfg, "attn_logit_softcapping", None) or None,
            "window": window, "dropout": float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
            "head_dim": head_dim, "half": amp_dtype in (torch.float16, torch.bfloat16)}


def kernel_for(needs: dict, device: torch.device) -> tuple[str | None, str | None]:
    """(kernel, None) or (None, why no varlen kernel fits) on a CUDA device."""
    if device.type != "cuda":
        return "reference", None
    why = []
    if not needs["half"]:
        why.append("flash varlen kernels need bf16/fp16 autocast (the run is fp32)")
    if needs["head_dim"] and needs["head_dim"] > 256:
        why.append(f"head size {needs['head_dim']} > 256")
    if why:
        return None, "; ".join(why)
    if flash_attn_func() is not None:
        return "flash_attn", None
    fn = torch_varlen_func()
    if fn is None:
        return None, ("neither the flash-attn package nor torch.nn.attention.varlen (torch >= "
                      "2.10) is available")
    p = _params(fn)
    missing = []
    if needs["softcap"]:
        missing.append(f"attention logit softcapping ({needs['softcap']:g})")
    if needs["dropout"]:
        missing.append(f"attention dropout ({needs['dropout']:g})")
    if needs["window"] and "window_size" not in p:
        missing.append(f"sliding windows ({needs['window']})")
    if missing:
        return None, ("torch's varlen_attn does not support " + ", ".join(missing) +
                      "; install flash-attn for varlen attention with it")
    return "torch", None


def choose(model, model_cfg, packing: bool, device: torch.device, amp_dtype) -> AttentionChoice:
    """The packed-attention path of this run (see the module docstring); installs the varlen
    function on ``model`` when chosen (after a probe). Call on the unwrapped model."""
    config = model.config
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    mode = model_cfg.packed_attention
    if mode == "model":
        return AttentionChoice(False, current, reason="--packed-attention model")
    asked_impl = model_cfg.attn_implementation
    if mode == "auto":
        if device.type != "cuda":
            return AttentionChoice(False, current, reason="on the CPU the default is "
                                   "transformers' own attention")
        if asked_impl not in (None, "sdpa"):
            return AttentionChoice(False, current, reason=f"--attn-implementation {asked_impl} "
                                   "was asked for")
    # padded rows use it too where it fits (no mask, no sync), but only packed rows count a
    # fallback: for padded rows transformers' sdpa path is a fine kernel already
    kernel, why = kernel_for(model_needs(config, amp_dtype), device)
    if kernel is None:
        if mode == "varlen":
            raise ConfigError(f"model.packed_attention: varlen asked for, but no varlen kernel "
                              f"fits on {device}: {why}")
        return AttentionChoice(False, current, reason=why, fallback=packing)
    rows, rows_why = rows_kernel_for(model_needs(config, amp_dtype), config, device, amp_dtype)
    why = install(model, kernel, rows)
    if why:
        if mode == "varlen":
            raise ConfigError(f"model.packed_attention: varlen: {why}")
        return AttentionChoice(False, current, reason=why, fallback=packing)
    return AttentionChoice(True, NAME, kernel=kernel, rows_kernel=rows, rows_reason=rows_why)


def rows_kernel_for(needs: dict, config, device: torch.device,
                    amp_dtype) -> tuple[str | None, str | None]:
    """("cudnn", None) when unpacked rows can take SDPA's cuDNN attention on ``device``, else
    (None, why not): no GPU, a feature that path lacks, or the probe failed."""
    if device.type != "cuda":
        return None, None
    lacks = [f for f in ("softcap", "window", "dropout") if needs[f]]
    if lacks:
        return None, "cuDNN attention path lacks " + ", ".join(lacks)
    cfg = getattr(config, "get_text_config", lambda: config)()
    hq = getattr(cfg, "num_attention_heads", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = needs["head_dim"]
    if not (hq and d) or hq % hkv:
        return None, "head counts not known from the config"
    why = probe_cudnn(hq, hkv, d, amp_dtype if needs["half"] else torch.float32, device)
    return ("cudnn", None) if why is None else (None, why)


def probe_cudnn(hq: int, hkv: int, d: int, dtype, device) -> str | None:
    """Forward and backward of cuDNN attention at these head counts and size on ``device``;
    None when they run, else why not."""
    try:
        q = torch.randn(1, hq, 64, d, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(1, hkv, 64, d, device=device, dtype=dtype, requires_grad=True)
        out = _cudnn_rows(q, kv, kv, d ** -0.5)
        out.float().sum().backward()
        if not bool(torch.isfinite(q.grad).all()):
            return "cuDNN attention gave a non-finite gradient in the setup probe"
    except Exception as e:  # not available on this GPU / build: the varlen kernel serves
        return f"cuDNN attention did not run ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def _cudnn_rows(query, key, value, scaling):
    """Causal attention per row on cuDNN: ``[B, Hq, T, D]`` -> ``[B, Hq, T, D]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])


def install(model, kernel: str, rows: str | None = None) -> str | None:
    """Register the function, switch ``model`` to it and probe; None on success, else why not
    (the model's implementation is then restored). ``rows``: the unpacked-rows kernel."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    config = model.config
    before = config._attn_implementation
    # resolved once here: the function runs inside compiled blocks too (--compile), where
    # imports and inspect calls would break the graph
    fn = {"flash_attn": flash_attn_func, "torch": torch_varlen_func}.get(kernel, lambda: None)()
    _ACTIVE.update(kernel=kernel, fn=fn, params=frozenset(_params(fn)) if fn else frozenset(),
                   rows=rows)
    config._attn_implementation = NAME
    why = probe(model)
    if why:
        config._attn_implementation = before
    else:
        model._sftctl_attn_before = (before,)
    return why


def uninstall(model) -> None:
    """Give the model back its own implementation (before saving it)."""
    before = model.__dict__.pop("_sftctl_attn_before", None)
    if before is not None:
        model.config._attn_implementation = before[0]


def probe(model) -> str | None:
    """One forward and backward over two packed documents: every attention layer must call the
    function, and the kernel's backward must run (a kernel without one is a fallback at setup,
    not a crash at the first step). The backward goes to the input embeddings only: the
    parameters are frozen for the probe, so no full set of gradients is allocated (on a large
    model before FSDP shards it, that would be a second copy of the weights)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    layers = getattr(cfg, "num_hidden_layers", None)
    dev = next(model.parameters()).device
    lens = [3, 5]
    T = sum(lens)
    V = getattr(cfg, "vocab_size", 2)
    ids = (torch.arange(T, device=dev) % V)[None]                              # [1, T]
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])[None]         # [1, T]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    before = dict(CALLS)
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()   # [1, T, H]
            out = model(inputs_embeds=emb, position_ids=pos, use_cache=False,
                        **varlen_kwargs(cu.to(dev), max(lens)))
            logits = getattr(out, "logits", None)
            if logits is not None and logits.requires_grad:
                logits.float().square().mean().backward()
    except Exception as e:
        return f"the model's forward/backward with {NAME} failed ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    calls = sum(CALLS.values()) - sum(before.values())
    if calls == 0:
        return ("the model does not dispatch its attention through transformers' "
                "AttentionInterface")
    if layers and calls != layers:
        return f"{calls} attention calls for {layers} layers"
    return None


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The forward kwargs transformers passes through to the attention function."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
            "max_length_q": int(max_seqlen), "max_length_k": int(max_seqlen)}


# ------------------------------------------------------------------------------ the function

def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, s_aux=None, **kwargs):
    """transformers attention function: ``query [B, Hq, T, D]``, ``key/value [B, Hkv, T, D]``
    -> ``([B, T, Hq, D], None)``; documents given by ``cu_seq_lens_q`` over the flat B*T."""
    if s_aux is not None:
        raise TrainingError(f"{NAME}: attention sinks (s_aux) are not supported; pass "
                            "--packed-attention model")
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if scaling is None:
        scaling = D ** -0.5
    if cu_seq_lens_q is None and _ACTIVE["rows"] == "cudnn" and query.is_cuda:
        _count("cudnn")
        out = _cudnn_rows(*_half(query, key, value), scaling)  # [B, Hq, T, D]
        return out.transpose(1, 2), None                        # [B, T, Hq, D]
    if cu_seq_lens_q is None:  # not packed: one causal sequence per (right-padded) row
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=query.device)
        max_len = T
    else:
        cu, max_len = cu_seq_lens_q, max_length_q  # a host int (a SymInt when compiled)
    q = query.transpose(1, 2).reshape(B * T, Hq, D)    # [B*T, Hq, D]
    k = key.transpose(1, 2).reshape(B * T, Hkv, D)     # [B*T, Hkv, D]
    v = value.transpose(1, 2).reshape(B * T, Hkv, D)   # [B*T, Hkv, D]
    kernel = _ACTIVE["kernel"]
    if kernel != "reference" and not query.is_cuda:
        kernel = "reference"
    _count(kernel)
    if kernel != "reference":
        q, k, v = _half(q, k, v)
    window = int(sliding_window) if sliding_window else None
    p = dropout if module.training else 0.0
    if kernel == "flash_attn":
        out = _ACTIVE["fn"](q, k, v, cu, cu, max_len, max_len, dropout_p=p,
                                softmax_scale=scaling, causal=True,
                                window_size=(window - 1, 0) if window else (-1, -1),
                                softcap=float(softcap or 0.0))
    elif kernel == "torch":
        out = _torch_varlen(q, k, v, cu, max_len, scaling, window)
    else:
        out = reference_varlen(q, k, v, cu, scaling=scaling, window=window, softcap=softcap,
                               dropout=p)
    return out.reshape(B, T, Hq, D), None


def _count(kernel: str) -> None:
    if not torch.compiler.is_compiling():  # a Python side effect: counted in eager only
        CALLS[kernel] = CALLS.get(kernel, 0) + 1


def _half(q, k, v):
    """q, k, v in the autocast dtype. Under autocast q/k arrive in fp32 after the model's RoPE
    (fp32 cos/sin); the flash and cuDNN kernels take 16-bit inputs only, so they are cast as
    transformers' own flash path does (the kernel choice refuses them for runs without 16-bit
    autocast)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q, k, v
    half = torch.get_autocast_dtype("cuda")
    return q.to(half), k.to(half), v.to(half)


def _torch_varlen(q, k, v, cu, max_len, scaling, window):
    fn, p = _ACTIVE["fn"], _ACTIVE["params"]
    if fn is None or _ACTIVE["kernel"] != "torch":  # called directly (tests)
        fn = torch_varlen_func()
        p = _params(fn)
    kw = {}
    if "scale" in p:
        kw["scale"] = scaling
    elif abs(scaling * q.shape[-1] ** 0.5 - 1.0) > 1e-7:
        q = q * (scaling * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(D)
    if "window_size" in p:
        kw["window_size"] = (window - 1, 0) if window else (-1, 0)
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in p:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)  # [N, Hq, D]
            v = v.repeat_interleave(rep, dim=1)  # [N, Hq, D]
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


@torch.compiler.disable  # a Python loop over documents: run eagerly inside compiled blocks
def reference_varlen(q, k, v, cu, *, scaling: float, window: int | None = None,
                     softcap: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Exact causal attention of each document ``[cu[i], cu[i+1])`` of the flat ``q [N, Hq, D]``,
    ``k/v [N, Hkv, D]`` (scores and softmax in fp32); ``[N, Hq, D]`` in q's dtype. ``cu`` is
    read on the host (a CPU tensor: no sync; a device tensor is copied once)."""
    bounds = cu.tolist()
    Hq, Hkv = q.shape[1], k.shape[1]
    rep = Hq // Hkv
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qs = q[s:e].transpose(0, 1).float()                                     # [Hq, L, D]
        ks = k[s:e].transpose(0, 1).float().repeat_interleave(rep, dim=0)       # [Hq, L, D]
        vs = v[s:e].transpose(0, 1).float().repeat_interleave(rep, dim=0)       # [Hq, L, D]
        scores = qs @ ks.transpose(1, 2) * scaling                              # [Hq, L, L]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        L = e - s
        i = torch.arange(L, device=q.device)
        allowed = i[None, :] <= i[:, None]                                      # [L, L]
        if window:
            allowed &= i[:, None] - i[None, :] < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out[s:e] = (probs @ vs).transpose(0, 1).to(q.dtype)                     # [L, Hq, D]
    return out


def availability() -> dict:
    """What this machine offers for packed attention (``sftctl doctor``)."""
    fa = flash_attn_func()
    tv = torch_varlen_func()
    version = None
    if fa is not None:
        try:
            import flash_attn

            version = getattr(flash_attn, "__version__", "installed")
        except Exception:
            version = "installed"
    cuda = torch.cuda.is_available()
    if not cuda:
        default = "transformers' own packed attention (the CPU default; --packed-attention " \
                  "varlen runs the exact per-document reference)"
    elif fa is not None:
        default = f"{NAME} with {KERNELS['flash_attn']}"
    elif tv is not None:
        default = (f"{NAME} with {KERNELS['torch']} (attention softcapping or dropout: "
                   "transformers' path, a counted fallback)")
    else:
        default = "transformers' own packed attention (a counted fallback: no varlen kernel)"
    return {"flash_attn": version, "torch_varlen_attn": tv is not None,
            "torch_varlen_window": tv is not None and "window_size" in _params(tv),
            "torch_varlen_gqa": tv is not None and "enable_gqa" in _params(tv),
            "packing_default": default}
