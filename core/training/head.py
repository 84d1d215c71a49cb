"""The fused output layer: the loss straight from the hidden states and the head's weight
(``sftctl.ops.linear_cross_entropy``), so the ``[N, V]`` logits and their gradient never exist.

Design choices
- The loss is computed *inside* the model's own forward, at the place the output layer is
  called. The head module (an exact ``nn.Linear``) gets a subclass, ``FusedLinearHead``, whose
  ``forward`` is the plain linear unless the trainer has posted a ``HeadRequest`` on it; with a
  request it computes the loss from its input and the weight, keeps it in the request and
  returns an empty ``[B, T, 0]`` placeholder for the model's logits. Running the body and then
  using the head weight outside the forward would break every wrapper that acts around the
  root's forward: DDP prepares its reducer there, and FSDP2 all-gathers the root's parameters
  (embeddings, final norm, head) in the root's pre-forward hook and keeps them gathered until
  backward; inside the forward the weight is the gathered (compute-dtype) parameter, so the
  fused path works unchanged under one process, DDP and FSDP2. Parameter names, state dicts,
  checkpoints and generation are unchanged (no request: a plain linear).
- The model's logit transforms come from its config (``final_logit_softcapping``: Gemma 2/3;
  ``logit_scale``: Cohere, a multiplier; ``logits_scaling``: Granite, a divisor) and are passed
  to the op (``logit_scale`` then ``softcap``, the op's order). They are not trusted blindly:
  at setup a *probe* runs the model once on 8 tokens with the head returning a known pattern of
  logits spanning [-40, 40] and checks that what the model returns equals the transform applied
  to that pattern (and that the head was called exactly once, on ``[B, T, hidden]``). Any
  architecture whose forward does ``head(hidden)`` then an elementwise transform we reproduce is
  accepted; anything else (another post-processing, several head calls, a head that is not a
  plain ``nn.Linear``: peft's LoRA on ``lm_head`` or ``modules_to_save``, a custom class, a whole
  model compiled as one graph) falls back to logits + ``cross_entropy`` with a reason that the
  trainer counts in ``fallbacks`` and shows in the log and summary.json.
- Tied embeddings (one process): the embedding's gradient is a scatter of a few thousand rows
  into a ``[V, H]`` tensor that autograd would otherwise build densely (a ``[V, H]`` fill, the
  scatter, then a ``[V, H]`` add into the head's gradient: 1.0 ms and two 1 GiB buffers per step
  at V = 128,256, H = 2048 in fp32 on an H200). ``route_embedding_grad`` swaps the input
  embedding's class for ``RowsIntoHeadGradEmbedding``, whose lookup is not connected to the
  weight in the graph: its backward adds the rows' gradients straight into ``weight.grad``
  (``index_put_`` with ``accumulate=True``: sorted, so deterministic on CUDA), which by then
  holds the head's gradient (autograd runs a leaf's gradient accumulation as soon as it is
  ready, and the head's backward comes first). Either order gives the same sum, and a step
  sums in fp32 as before (only the order of the additions differs). Not under DDP/FSDP (their
  gradient hooks fire when the head's gradient lands, before the rows are added), nor when the
  weight already has gradient hooks of its own (checked at install; one registered later sees
  only the head's part), nor for an embedding with ``max_norm``, ``scale_grad_by_freq``,
  sparse gradients or a class of its own.
- Ignored targets: the trainer knows on the host which rows have a target (the labels rule run
  on the collated CPU tensors), so it passes their indices and the op runs with
  ``compact=False`` on exactly those rows: the matmul skips prompt and padding rows without the
  host sync that the op's own compaction (a count read from the device) would need.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..errors import TrainingError
from .loss import IGNORE_INDEX

log = logging.getLogger("sftctl")

PROBE_TOKENS = 8
PROBE_RANGE = 40.0


@dataclasses.dataclass
class HeadRequest:
    """What the trainer asks of the head for one forward (a loss, or the setup probe)."""

    labels: torch.Tensor | None = None        # [B, T] int64, IGNORE_INDEX = no target
    rows: torch.Tensor | None = None          # [n > 0] int64 flat rows with a target; None: all
    normalizer: torch.Tensor | None = None    # 0-dim fp32 (reduction mean)
    reduction: str = "mean"
    grad_scale: torch.Tensor | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    probe: torch.Tensor | None = None         # [B, T, V]: return this as the logits (setup)
    loss: torch.Tensor | None = None          # set by the head
    chunk_rows: int | None = None             # rows per chunk of the op (None: its default)
    calls: int = 0
    hidden_shape: tuple | None = None


class FusedLinearHead(torch.nn.Linear):
    """An ``nn.Linear`` output layer that computes the fused loss when a request is posted
    (see the module docstring); the class is swapped in place and back."""

    _sftctl_transform: dict
    _sftctl_request: HeadRequest | None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        req = self.__dict__.get("_sftctl_request")
        if req is None:
            return super().forward(hidden)
        req.calls += 1
        req.hidden_shape = tuple(hidden.shape)
        if req.probe is not None:
            return req.probe
        if req.calls > 1:
            raise TrainingError("the fused head was called twice in one forward; pass "
                                "--fused-head off")
        from .. import ops

        H = hidden.shape[-1]
        flat = hidden.reshape(-1, H)            # [B*T, H]
        targets = req.labels.reshape(-1)        # [B*T]
        # the trainer chose the rows on the host; the op's own compaction would read a count
        # from the device (a sync). No rows given (none has a target, e.g. a distributed filler
        # row): every row goes through, contributing exactly 0, so every weight still gets its
        # (zero) gradient, as DDP expects.
        kw = {"compact": False}
        if req.rows is not None:
            flat = flat.index_select(0, req.rows)        # [n, H]
            targets = targets.index_select(0, req.rows)  # [n]
        if req.grad_scale is not None:
            kw["grad_scale"] = req.grad_scale
        t = self._sftctl_transform
        req.loss = ops.linear_cross_entropy(
            flat, self.weight, targets, self.bias, ignore_index=IGNORE_INDEX,
            reduction=req.reduction,
            normalizer=req.normalizer if req.reduction == "mean" else None,
            label_smoothing=req.label_smoothing, z_loss=req.z_loss,
            softcap=t["softcap"], logit_scale=t["logit_scale"], chunk_rows=req.chunk_rows,
            **kw)
        return hidden.new_empty(tuple(hidden.shape[:-1]) + (0,))  # [B, T, 0]: no logits


def op_available() -> str | None:
    """None when ``sftctl.ops.linear_cross_entropy`` can be imported, else why not."""
    try:
        from .. import ops
    except Exception as e:  # the extension is missing: the trainer already says so
        return f"sftctl.ops does not load ({type(e).__name__}: {e})"
    if not hasattr(ops, "linear_cross_entropy"):
        return "this sftctl build has no sftctl.ops.linear_cross_entropy"
    return None


def config_transform(config) -> dict:
    """The logit transform a causal LM's config declares: ``logits = softcap(scale * z)``."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        scale = float(config.logit_scale)              # Cohere: logits * logit_scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor not in (None, 1, 1.0):
        scale = (scale or 1.0) / float(divisor)
    return {"softcap": float(softcap) if softcap else None, "logit_scale": scale}


def describe_transform(t: dict) -> str:
    parts = []
    if t["logit_scale"] is not None:
        parts.append(f"logit scale {t['logit_scale']:g}")
    if t["softcap"] is not None:
        parts.append(f"softcap {t['softcap']:g}")
    return ", ".join(parts) or "no logit transform"


def apply_transform(z: torch.Tensor, t: dict) -> torch.Tensor:
    """What the op does to the logits ``z`` (the reference for the probe and the tests)."""
    if t["logit_scale"] is not None:
        z = z * t["logit_scale"]
    if t["softcap"] is not None:
        z = t["softcap"] * torch.tanh(z / t["softcap"])
    return z


def output_layer(model):
    """The model's output layer (through peft and DDP wrappers), or None."""
    inner = getattr(model, "module", model)  # DDP
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


class FusedHead:
    """The fused output layer of one model: ``install`` (with the probe) or a reason why not.

    ``plan(model, ...)`` returns ``(FusedHead, None)`` or ``(None, reason)``."""

    def __init__(self, head: torch.nn.Linear, transform: dict, tied: bool):
        self.head = head
        self.transform = transform
        self.tied = tied
        self.routed: torch.nn.Embedding | None = None  # see route_embedding_grad

    # ------------------------------------------------------------------------------ set up
    @classmethod
    def plan(cls, model, *, whole_model_compiled: bool = False
             ) -> tuple["FusedHead | None", str | None]:
        """Check the model's output layer and install the fused head, or say why not.
        Call on the unwrapped model (before DDP/FSDP), before ``torch.compile``."""
        why = op_available()
        if why:
            return None, why
        if whole_model_compiled:
            return None, ("the model names no transformer block class, so --compile compiles "
                          "its whole forward, head included")
        head = output_layer(model)
        if head is None:
            return None, "the model has no output embeddings (get_output_embeddings() is None)"
        if type(head) is not torch.nn.Linear:
            kind = f"{type(head).__module__}.{type(head).__qualname__}"
            hint = (" (peft wraps the output layer: LoRA on lm_head or modules_to_save)"
                    if "peft" in type(head).__module__ else "")
            return None, f"the output layer is a {kind}, not a plain torch.nn.Linear{hint}"
        config = getattr(model, "config", None)
        transform = config_transform(config)
        inputs = _embeddings_weight(model)
        tied = inputs is not None and inputs is head.weight
        self = cls(head, transform, tied)
        self.install()
        why = self.probe(model)
        if why:
            self.uninstall()
            return None, why
        return self, None

    def install(self) -> None:
        self.head.__class__ = FusedLinearHead
        self.head._sftctl_transform = dict(self.transform)
        self.head._sftctl_request = None

    def uninstall(self) -> None:
        if type(self.head) is FusedLinearHead:
            self.head.__dict__.pop("_sftctl_request", None)
            self.head.__dict__.pop("_sftctl_transform", None)
            self.head.__class__ = torch.nn.Linear

    def describe(self) -> str:
        return (f"sftctl linear_cross_entropy on the output layer's input and weight "
                f"({'tied' if self.tied else 'untied'} head"
                f"{', embedding rows added into its gradient' if self.routed else ''}"
                f"{', bias' if self.head.bias is not None else ''}; "
                f"{describe_transform(self.transform)})")

    @torch.no_grad()
    def probe(self, model) -> str | None:
        """Run the model on PROBE_TOKENS tokens with the head returning a known pattern and
        compare what comes out with the transform applied to it (module docstring)."""
        w = self.head.weight
        V = w.shape[0]
        dev = w.device
        ids = (torch.arange(PROBE_TOKENS, device=dev) % V)[None]  # [1, P]
        pattern = torch.linspace(-PROBE_RANGE, PROBE_RANGE, PROBE_TOKENS * V, device=dev,
                                 dtype=torch.float32)
        # a permutation so that neighbouring logits differ (a row is not a smooth ramp)
        gen = torch.Generator().manual_seed(0)
        pattern = pattern[torch.randperm(pattern.numel(), generator=gen).to(dev)]
        pattern = pattern.view(1, PROBE_TOKENS, V).to(w.dtype)  # [1, P, V]
        req = HeadRequest(probe=pattern)
        was_training = model.training
        model.eval()
        self.head._sftctl_request = req
        try:
            out = model(input_ids=ids, position_ids=torch.arange(PROBE_TOKENS, device=dev)[None],
                        use_cache=False)
        except Exception as e:
            return (f"the probe forward with a stand-in head output failed "
                    f"({type(e).__name__}: {e})")
        finally:
            self.head._sftctl_request = None
            model.train(was_training)
        if req.calls != 1:
            return f"the model called its output layer {req.calls} times in one forward"
        H = w.shape[1]
        if req.hidden_shape != (1, PROBE_TOKENS, H):
            return (f"the output layer's input has shape {req.hidden_shape}, not the hidden "
                    f"states [1, {PROBE_TOKENS}, {H}]")
        logits = getattr(out, "logits", None)
        if logits is None or tuple(logits.shape) != (1, PROBE_TOKENS, V):
            got = None if logits is None else tuple(logits.shape)
            return f"the model's logits (shape {got}) are not its output layer's [1, P, V]"
        want = apply_transform(pattern.double(), self.transform)
        err = (logits.double() - want).abs()
        tol = 1e-5 * (1.0 + want.abs())
        if bool((err > tol).any()):
            bad = float(err.max())
            return (f"the model transforms its head's logits in a way sftctl does not reproduce "
                    f"(expected {describe_transform(self.transform)} from its config; max "
                    f"difference {bad:.3g} on the probe)")
        if not math.isfinite(float(logits.double().abs().max())):
            return "the probe's logits are not finite"
        return None

    def route_embedding_grad(self, model) -> str | None:
        """Tied head: add the embedding rows' gradients into the head's gradient in place
        (module docstring). Returns None when installed, else why not. One process only:
        call on the unwrapped model, before DDP/FSDP."""
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        if not self.tied:
            return "the head is not tied to the input embeddings"
        if type(emb) is not torch.nn.Embedding:
            kind = f"{type(emb).__module__}.{type(emb).__qualname__}"
            return f"the input embedding is a {kind}, not a plain torch.nn.Embedding"
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            return "the input embedding uses max_norm, scale_grad_by_freq or sparse gradients"
        if not emb.weight.requires_grad:
            return "the tied weight is frozen"
        if emb.weight._backward_hooks or getattr(emb.weight, "_post_accumulate_grad_hooks", None):
            return ("the tied weight has gradient hooks (they would see the head's part of its "
                    "gradient only)")
        emb.__class__ = RowsIntoHeadGradEmbedding
        self.routed = emb
        return None

    def uninstall_embedding_route(self) -> None:
        emb = self.routed
        if emb is not None and type(emb) is RowsIntoHeadGradEmbedding:
            emb.__dict__.pop("_sftctl_anchor", None)
            emb.__class__ = torch.nn.Embedding
        self.routed = None

    # ------------------------------------------------------------------------------- use
    def post(self, req: HeadRequest | None) -> None:
        self.head._sftctl_request = req


class _RowsIntoWeightGrad(torch.autograd.Function):
    """``embedding(ids, weight)`` whose backward adds the rows' gradients into ``weight.grad``
    in place instead of returning a dense ``[V, H]`` gradient. The weight travels in a list, so
    autograd draws no edge to it; ``anchor`` (an empty tensor that requires grad) makes the
    output differentiable so that this backward runs."""

    @staticmethod
    def forward(ctx, ids, anchor, holder, padding_idx):
        weight = holder[0]
        ctx.save_for_backward(ids)
        ctx.holder, ctx.padding_idx = holder, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)  # [*, H]

    @staticmethod
    def backward(ctx, grad):  # grad: [*, H]
        (ids,) = ctx.saved_tensors
        weight = ctx.holder[0]
        flat = ids.reshape(-1)                                   # [n]
        rows = grad.reshape(flat.numel(), weight.shape[1]).to(weight.dtype)  # [n, H]
        if ctx.padding_idx is not None:  # nn.Embedding never updates its padding row
            rows = rows.masked_fill((flat == ctx.padding_idx).unsqueeze(1), 0.0)
        if weight.grad is None:  # the head's gradient has not landed (yet): start from zero
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_put_((flat,), rows, accumulate=True)
        return None, None, None, None


class RowsIntoHeadGradEmbedding(torch.nn.Embedding):
    """The input embedding of a tied fused head (class swapped in place and back): the lookup
    of ``_RowsIntoWeightGrad`` where a gradient is wanted, the plain one otherwise."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (torch.is_grad_enabled() and w.requires_grad):
            return super().forward(ids)
        anchor = self.__dict__.get("_sftctl_anchor")
        if anchor is None or anchor.device != w.device:
            anchor = torch.empty(0, device=w.device, requires_grad=True)
            self.__dict__["_sftctl_anchor"] = anchor
        return _RowsIntoWeightGrad.apply(ids, anchor, [w], self.padding_idx)


def _embeddings_weight(model):
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:
        return None
    return getattr(emb, "weight", None)


class posted:
    """``with posted(fused_head, request): model(...)``: the request is on the head only for
    that forward (cleared on exceptions too)."""

    def __init__(self, fused: FusedHead, req: HeadRequest):
        self.fused, self.req = fused, req

    def __enter__(self) -> HeadRequest:
        self.fused.post(self.req)
        return self.req

    def __exit__(self, *exc):
        self.fused.post(None)
        return False


def target_rows(labels_cpu: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64, CPU) of the positions of ``labels_cpu [B, T]`` that have a target."""
    return (labels_cpu.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]


def availability() -> dict:
    """The fused head's op on this machine (``sftctl doctor``)."""
    why = op_available()
    kernels = []
    if why is None and torch._C._dispatch_has_kernel("sftctl::linear_cross_entropy"):
        kernels = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(
            "sftctl::linear_cross_entropy", k)]
    return {"available": why is None, "reason": why, "compiled_kernels": kernels}
