"""The CUDA caching allocator's mode for a run (``--cuda-allocator``).

Design choices
- Packed batches change their shapes every step, and so do the fused head's chunks. When no
  cached block fits a request, torch's default allocator frees cached blocks (``cudaFree``,
  which waits for the device) and allocates anew, and a fragmented cache can fail a request
  that the free memory would hold. Expandable segments map more physical memory into one
  growing virtual range instead: the cache does not fragment. No speed change was measured in
  a same-call comparison on the 1.24B workloads (bench/results/e2e_H200_2026-12-01_s6.md says
  what was and was not measured); it is on for robustness under changing shapes.
- The setting has to be in place before the process's first CUDA allocation: the trainer makes
  the choice in its runtime setup, before the model loads. If memory is already reserved (a
  library user who allocated first), the setting still applies to the segments made from then
  on, and the log says so.
- Under ``auto`` a ``PYTORCH_CUDA_ALLOC_CONF`` in the environment wins (the process is the user's
  to configure); ``expandable`` applies on top of it. The choice is logged and kept in
  ``summary.json`` (``cuda_allocator``).
"""

from __future__ import annotations

import os
import warnings

import torch

ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def _set_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is not None:
        setter(settings)
        return
    with warnings.catch_warnings():  # older torch: the (later deprecated) cuda-only spelling
        warnings.simplefilter("ignore", FutureWarning)
        torch.cuda.memory._set_allocator_settings(settings)


def configure(asked: str, device: torch.device) -> dict:
    """Apply ``asked`` (auto | expandable | torch) for a run on ``device``; returns what
    summary.json records: the mode in effect and why."""
    if asked not in ("auto", "expandable", "torch"):
        raise ValueError(f"cuda_allocator: unknown mode {asked!r}")
    if device.type != "cuda":
        return {"mode": "none", "reason": f"no CUDA device (device {device.type})"}
    env = os.environ.get(ENV)
    if asked == "torch":
        return {"mode": "torch", "reason": "asked (--cuda-allocator torch)", "env": env}
    if asked == "auto" and env:
        return {"mode": "env", "reason": f"{ENV}={env} is set: used as it is", "env": env}
    late = torch.cuda.is_initialized() and torch.cuda.memory_reserved(device) > 0
    _set_settings(EXPANDABLE)
    why = ("asked (--cuda-allocator expandable)" if asked == "expandable" else
           "auto: CUDA, and no " + ENV + " in the environment")
    if late:
        why += "; memory was already reserved, so only segments made from now on expand"
    return {"mode": "expandable", "reason": why, "env": env}
