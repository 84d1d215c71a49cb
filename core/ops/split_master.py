"""fp32 master weights stored as two 16-bit halves: the bf16 weight the model computes with, and
the 16 bits it lacks.

Design choices
- Under bf16 autocast a Linear layer computes with ``bf16(w)`` and its weight gradient comes out
  of a bf16 GEMM, so the fp32 weight buys nothing in the forward and the fp32 gradient holds a
  bf16 value. Keeping the weight as a bf16 tensor (``weight``) plus an int16 tensor (``low``)
  holds the same fp32 master exactly in the same 4 bytes, lets autograd write the gradient in
  bf16 (2 bytes per weight fewer) and spares autocast's cast of every weight in each forward.
- ``weight`` is the fp32 bit pattern rounded to its top 16 bits, to nearest with ties away from
  zero (autocast rounds ties to even: the two differ only for fp32 values whose low 16 bits are
  exactly 0x8000, and then by one bf16 unit). Ties away from zero keep the remainder
  ``u - (weight << 16)`` within [-32768, 32767], so it always fits ``low`` and the pair decodes
  back to the exact fp32 value, infinities and NaN included.
- Pure tensor ops on integer views, any device; used once at setup (split) and per saved
  checkpoint (join). The optimizer step that updates both halves is ``adamw_split_`` (compiled).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def split_fp32(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``master`` -> (``weight`` bf16, ``low`` int16), same shape, exact (see the module
    notes)."""
    if master.dtype != torch.float32:
        raise TypeError(f"split_fp32: expected a float32 tensor, got {master.dtype}")
    u = master.contiguous().view(torch.int32).to(torch.int64) & _MASK32  # fp32 bits, unsigned
    top = ((u + 0x8000) >> 16) & 0xFFFF                                    # rounded top half
    # u - (top << 16) lies in [-32768, 32767] and agrees with u mod 2^16: it is the low 16
    # bits of u read as a signed number
    low = u & 0xFFFF
    low = torch.where(low >= 0x8000, low - 0x10000, low)
    weight = torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)
    return weight, low.to(torch.int16)


def join_fp32(weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(``weight`` bf16, ``low`` int16) -> the fp32 master they hold."""
    if weight.dtype != torch.bfloat16 or low.dtype != torch.int16:
        raise TypeError(f"join_fp32: expected bfloat16 and int16 tensors, got {weight.dtype} "
                        f"and {low.dtype}")
    if weight.shape != low.shape:
        raise ValueError(f"join_fp32: shapes differ: {tuple(weight.shape)} and "
                         f"{tuple(low.shape)}")
    top = weight.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    u = ((top << 16) + low.to(torch.int64)) & _MASK32
    u = torch.where(u > 0x7FFFFFFF, u - (1 << 32), u)
    return u.to(torch.int32).view(torch.float32)
