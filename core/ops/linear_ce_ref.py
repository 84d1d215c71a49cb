"""Pure-PyTorch chunked linear + cross-entropy: reference and fallback of ``linear_cross_entropy``.

``torch_linear_cross_entropy`` computes exactly what ``sftctl.ops.linear_cross_entropy`` computes
(same options, same outputs, same gradients) with stock torch ops, chunk by chunk over rows, so
the [N, V] logits never exist in full. It is used

- as the fallback when sftctl._C has no kernel for the inputs' device (``linear_cross_entropy``
  calls it and says so once in a warning), and
- as an independent second implementation in tests/test_linear_ce.py.

Design choices
- Logits of a chunk are fp32: ``hidden.float() @ weight.float().T`` of the GEMM-dtype operands
  (products of bf16/fp16 values are exact in fp32, accumulation in fp32), so the loss is not
  limited by a bf16 rounding of the logits. The weight is converted to fp32 once per call (a
  V x d fp32 temporary; the compiled op avoids it on CUDA with fp32-output GEMMs).
- The gradient of the logits chunk is rounded once to the GEMM dtype (what the compiled op feeds
  its backward GEMMs), then ``dhidden = dlogits @ W`` and ``dweight += dlogits.T @ h`` are done in
  fp32; dweight/dbias accumulate in fp32 across chunks and are rounded once at the end.
- For reduction mean/sum the gradients are computed during forward (the loss is a scalar, so
  backward only rescales by ``grad_output / grad_scale``); for ``none`` backward recomputes the
  chunks with the per-row ``grad_output`` folded into each row's gradient.
- Compaction: rows whose target is ``ignore_index`` are dropped before the matmul (their loss,
  lse and dhidden rows are 0). That needs the count on the host (a sync), so it is skipped while a
  CUDA graph is being captured or when ``compact=False``; the ignored rows then go through the
  matmul and contribute exactly 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["torch_linear_cross_entropy", "LinearCrossEntropyOutput", "default_chunk_rows",
           "op_chunk_rows",
           "CHUNK_BYTES", "resolve_compact"]


class LinearCrossEntropyOutput(NamedTuple):
    """``(loss, lse)`` of ``linear_cross_entropy(..., return_lse=True)``; lse is fp32 per row
    (0 for ignored rows) and not differentiable."""

    loss: torch.Tensor
    lse: torch.Tensor

# Budget of one fp32 logits chunk of this stock-PyTorch twin (rows * V * 4 bytes). 1 GiB: 2048
# rows at V = 128256, 1024 rows at V = 262144 -- large enough that the GEMMs run near their peak.
CHUNK_BYTES = 1 << 30
# The compiled op's budgets (csrc/binding.cpp): the logits gradient kept per chunk, in the GEMM
# dtype, and the fp32 logits piece inside a chunk.
OP_CHUNK_BYTES = 3 << 29
OP_PIECE_BYTES = 512 << 20


def _rows_within(budget: int, row_bytes: int) -> int:
    rows = max(1, budget // max(int(row_bytes), 1))
    return rows // 128 * 128 if rows >= 128 else rows


def default_chunk_rows(vocab: int, n_rows: int) -> int:
    """Rows per chunk of ``torch_linear_cross_entropy``: the most that keep rows * V * 4 bytes
    <= CHUNK_BYTES, a multiple of 128 when that is >= 128 (GEMM tile friendly), never more than
    the rows there are (and >= 1)."""
    rows = _rows_within(CHUNK_BYTES, 4 * max(int(vocab), 1))
    return max(1, min(rows, max(int(n_rows), 1)))


def op_chunk_rows(vocab: int, n_rows: int, *, gemm_bytes: int, spared_bytes: int = 0) -> int:
    """Rows per chunk of the compiled ``sftctl.ops.linear_cross_entropy`` for ``n_rows`` rows
    with a target (mirrors ``lce_chunk_rows`` in csrc/binding.cpp). ``gemm_bytes``: bytes of one
    kept logits-gradient value (2 for bf16/fp16 on CUDA, 6 on the CPU, which also makes an fp32
    copy for its GEMMs; 4 for fp32); ``spared_bytes``: V * d * 4 for a 16-bit weight that gets a
    gradient (the fp32 dweight accumulator a single chunk spares), else 0. All rows form one
    chunk when their gradient fits OP_CHUNK_BYTES + spared_bytes; otherwise each chunk's
    gradient fits OP_CHUNK_BYTES (a multiple of 128 rows when >= 128)."""
    n = max(int(n_rows), 1)
    row_bytes = max(int(gemm_bytes) * max(int(vocab), 1), 1)
    if n <= (OP_CHUNK_BYTES + int(spared_bytes)) // row_bytes:
        return n
    return max(1, min(_rows_within(OP_CHUNK_BYTES, row_bytes), n))


def resolve_compact(compact: Optional[bool], device: torch.device) -> bool:
    """``None`` (auto): compact unless a CUDA graph is being captured on the current stream."""
    if compact is not None:
        return bool(compact)
    if device.type == "cuda" and torch.cuda.is_available():
        return not torch.cuda.is_current_stream_capturing()
    return True


def _chunk_math(h, w32, b32, t, *, ignore_index, label_smoothing, z_loss, softcap, logit_scale,
                row_factor, want_grad, gemm_dtype):
    """One chunk: fp32 logits, per-row loss and lse, and (want_grad) dlogits in ``gemm_dtype``.

    ``row_factor``: fp32 [rows] (or 0-dim) gradient factor of each row (mean/sum scale, per-row
    grad_output), multiplied by ``logit_scale`` here.
    """
    acc = w32.dtype  # fp32 (fp64 only for fp64 inputs: gradcheck)
    z = h.to(acc) @ w32.t()  # [rows, V] fp32
    if b32 is not None:
        z = z + b32
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap:
        tz = torch.tanh(z / softcap)  # [rows, V]
        zc = softcap * tz
    else:
        zc = z
    v = zc.shape[1]
    valid = t != ignore_index  # [rows]
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(zc, dim=1)  # [rows]
    zt = zc.gather(1, safe_t[:, None])[:, 0]  # [rows]
    row = (1.0 - label_smoothing) * (lse - zt)
    if label_smoothing:
        row = row + label_smoothing * (lse - zc.sum(1) / v)
    if z_loss:
        row = row + z_loss * lse * lse
    row = torch.where(valid, row, torch.zeros_like(row))
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    if not want_grad:
        return row, lse, None
    p = torch.exp(zc - lse[:, None])  # [rows, V]
    g = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    if label_smoothing:
        g = g - label_smoothing / v
    g.scatter_add_(1, safe_t[:, None], torch.full_like(zt[:, None], -(1.0 - label_smoothing)))
    if softcap:
        g = g * (1.0 - tz * tz)
    factor = torch.where(valid, row_factor * logit_scale, 0.0)  # [rows]
    g = g * factor[:, None]
    return row, lse, g.to(gemm_dtype)


def _check_args(hidden, weight, targets, bias, reduction):
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ['mean', 'none', 'sum'], got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor of shape [..., d]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, d], got shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has {weight.shape[1]} input features but hidden's last "
                         f"dimension is {hidden.shape[-1]} (weight is [V, d])")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)} without its last (feature) dimension")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be 1-D [V] = [{weight.shape[0]}], got shape "
                         f"{tuple(bias.shape)}")


def _forward_chunks(h, w, b, t, *, row_factor, ignore_index, label_smoothing, z_loss, softcap,
                    logit_scale, chunk_rows, want_dh, want_dw, want_db, gemm_dtype):
    """Runs the chunks over rows of (already compacted or not) h [n, d]; returns per-row loss and
    lse (fp32 [n]) and the fp32 gradients asked for."""
    n = h.shape[0]
    acc = torch.float64 if gemm_dtype == torch.float64 else torch.float32
    w32 = w.to(gemm_dtype).to(acc)  # [V, d]
    b32 = b.to(gemm_dtype).to(acc) if b is not None else None  # [V], rounded like the weight
    want_grad = want_dh or want_dw or want_db
    rows_out = torch.zeros(n, dtype=acc, device=h.device)
    lse_out = torch.zeros(n, dtype=torch.float32, device=h.device)
    dh = torch.zeros(n, h.shape[1], dtype=acc, device=h.device) if want_dh else None
    dw = torch.zeros_like(w32) if want_dw else None
    db = torch.zeros_like(b32) if (want_db and b32 is not None) else None
    step = chunk_rows or default_chunk_rows(w.shape[0], n)
    with torch.autocast(h.device.type, enabled=False):  # the matmuls here are fp32 on purpose
        _chunk_loop(h, t, w32, b32, row_factor, step, rows_out, lse_out, dh, dw, db, want_grad,
                    gemm_dtype, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap, logit_scale=logit_scale)
    return rows_out, lse_out, dh, dw, db


def _chunk_loop(h, t, w32, b32, row_factor, step, rows_out, lse_out, dh, dw, db, want_grad,
                gemm_dtype, **opts):
    n = h.shape[0]
    acc = w32.dtype
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        hc = h[r0:r1].to(gemm_dtype)  # [rows, d]
        rf = row_factor[r0:r1] if row_factor.dim() else row_factor
        row, lse, g = _chunk_math(hc, w32, b32, t[r0:r1], row_factor=rf, want_grad=want_grad,
                                  gemm_dtype=gemm_dtype, **opts)
        rows_out[r0:r1] = row
        lse_out[r0:r1] = lse
        if g is not None:
            g32 = g.to(acc)  # [rows, V], the GEMM-dtype values
            if dh is not None:
                dh[r0:r1] = g32 @ w32
            if dw is not None:
                dw += g32.t() @ hc.to(acc)
            if db is not None:
                db += g32.sum(0)


class _TorchLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, normalizer, grad_scale, opts):
        red = opts["reduction"]
        ii = opts["ignore_index"]
        n = hidden.shape[0]
        gemm_dtype = hidden.dtype
        valid = targets != ii
        compact = resolve_compact(opts["compact"], hidden.device)
        idx = None
        if compact:
            n_valid = int(valid.sum())  # host sync (eager only)
            if n_valid < n:
                idx = valid.nonzero()[:, 0]
        h_c = hidden if idx is None else hidden.index_select(0, idx)
        t_c = targets if idx is None else targets.index_select(0, idx)
        dev = hidden.device
        gs = (grad_scale.float() if grad_scale is not None
              else torch.ones((), dtype=torch.float32, device=dev))
        if red == "mean":
            div = normalizer.float() if normalizer is not None else valid.sum().float()
            factor = torch.where(div != 0, gs / torch.where(div != 0, div, 1.0),
                                 torch.zeros((), device=dev))
        else:
            factor = gs
        need = ctx.needs_input_grad
        fused = red != "none"
        rows, lse, dh, dw, db = _forward_chunks(
            h_c, weight, bias, t_c, row_factor=factor, ignore_index=ii,
            label_smoothing=opts["label_smoothing"], z_loss=opts["z_loss"],
            softcap=opts["softcap"], logit_scale=opts["logit_scale"],
            chunk_rows=opts["chunk_rows"], want_dh=fused and need[0], want_dw=fused and need[1],
            want_db=fused and bias is not None and need[2], gemm_dtype=gemm_dtype)
        if idx is not None:
            rows = torch.zeros(n, dtype=rows.dtype, device=dev).index_copy_(0, idx, rows)
            lse = torch.zeros(n, dtype=torch.float32, device=dev).index_copy_(0, idx, lse)
            if dh is not None:
                dh = torch.zeros(n, dh.shape[1], dtype=dh.dtype, device=dev).index_copy_(0, idx, dh)
        out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        if red == "none":
            loss = rows.to(out_dtype)
        else:
            total = rows.double().sum()
            if red == "mean":
                total = torch.where(div != 0, total / torch.where(div != 0, div.double(), 1.0),
                                    torch.zeros((), dtype=torch.float64, device=dev))
            loss = total.to(out_dtype)
        ctx.opts = opts
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        if fused:
            ctx.grads = (None if dh is None else dh.to(hidden.dtype),
                         None if dw is None else dw.to(weight.dtype),
                         None if db is None else db.to(bias.dtype))
            ctx.save_for_backward(gs)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        opts = ctx.opts
        need = ctx.needs_input_grad
        if grad_loss is None:
            return (None,) * 7
        if opts["reduction"] != "none":
            (gs,) = ctx.saved_tensors
            f = grad_loss.double() / gs
            out = []
            for g in ctx.grads:
                out.append(None if g is None else (g.double() * f).to(g.dtype)
                           if g.dtype == torch.float64 else (g.float() * f.float()).to(g.dtype))
            dh, dw, db = out
            return (dh if need[0] else None, dw if need[1] else None,
                    db if need[2] else None, None, None, None, None)
        hidden, weight, bias, targets = ctx.saved_tensors
        factor = grad_loss.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        factor = factor.reshape(-1)  # [n]: d(result)/d(row loss); grad_scale unused
        ii = opts["ignore_index"]
        valid = targets != ii
        n = hidden.shape[0]
        idx = None
        if resolve_compact(opts["compact"], hidden.device):
            if int(valid.sum()) < n:
                idx = valid.nonzero()[:, 0]
        sel = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx))
        _, _, dh, dw, db = _forward_chunks(
            sel(hidden), weight, bias, sel(targets), row_factor=sel(factor), ignore_index=ii,
            label_smoothing=opts["label_smoothing"], z_loss=opts["z_loss"],
            softcap=opts["softcap"], logit_scale=opts["logit_scale"],
            chunk_rows=opts["chunk_rows"], want_dh=need[0], want_dw=need[1],
            want_db=bias is not None and need[2], gemm_dtype=hidden.dtype)
        if dh is not None and idx is not None:
            dh = torch.zeros(n, dh.shape[1], dtype=dh.dtype,
                             device=dh.device).index_copy_(0, idx, dh)
        return (None if dh is None else dh.to(hidden.dtype),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None)


def torch_linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, normalizer=None,
                               z_loss=0.0, softcap=None, logit_scale=None, return_lse=False,
                               grad_scale=None, chunk_rows=None, compact=None):
    """Stock-PyTorch ``linear_cross_entropy`` (same signature and results); see the module doc.

    ``hidden [..., d]`` is flattened to rows; ``weight [V, d]``; the GEMM runs in hidden's dtype.
    """
    _check_args(hidden, weight, targets, bias, reduction)
    d = hidden.shape[-1]
    flat_h = hidden.reshape(-1, d)
    flat_t = targets.reshape(-1).long()
    dev = hidden.device

    def scalar(x):
        if x is None or isinstance(x, torch.Tensor):
            return x
        return torch.tensor(float(x), dtype=torch.float32, device=dev)

    opts = {"reduction": reduction, "ignore_index": int(ignore_index),
            "label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
            "softcap": float(softcap) if softcap else 0.0,
            "logit_scale": 1.0 if logit_scale is None else float(logit_scale),
            "chunk_rows": chunk_rows, "compact": compact}
    loss, lse = _TorchLinearCE.apply(flat_h, weight, bias, flat_t, scalar(normalizer),
                                     scalar(grad_scale), opts)
    if reduction == "none":
        loss = loss.view(targets.shape)
    if return_lse:
        return LinearCrossEntropyOutput(loss, lse.view(targets.shape))
    return loss
