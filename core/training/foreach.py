"""Multi-tensor norms that keep torch's one-launch path.

``torch._foreach_norm`` runs its multi-tensor kernel only when every tensor of the list shares one
device and one dtype; a mixed list (bf16 split weights next to fp32 embeddings and norm weights)
falls back to one reduction kernel per tensor. On the 1.24B model that was 224 launches and
2.5 ms of a 124 ms H200 step for the gradient norm and the parameter check together
(bench/results/profile_a_H200_2026-12-01_split.json). So the tensors are grouped by (device,
dtype) first, as torch's own ``clip_grad_norm_`` does; the per-tensor results come back in the
order of the input.
"""

from __future__ import annotations

import torch


def foreach_norms(tensors: list[torch.Tensor], ord: float,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """``torch._foreach_norm(tensors, ord, dtype=dtype)`` with one call per (device, dtype)
    group: the same per-tensor norms (0-dim tensors, in the input's order)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], ord, dtype=dtype)
        for i, n in zip(idx, norms):
            out[i] = n
    return out  # type: ignore[return-value]
