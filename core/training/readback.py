"""Reading device values on the host without stalling the device.

Design choice: a logged step's scalars (loss, gradient norm, token counts, the guard's flags)
are concatenated into one small device vector and copied into pinned host memory with
``non_blocking=True``, followed by a CUDA event. ``values()`` waits on that event only, so
reading step k after step k+1 has been queued waits for step k's work, never for step k+1's
(a plain ``float(t)`` would wait for everything queued on the stream). On the CPU the vector is
read directly (no device to wait for).
"""

from __future__ import annotations

import torch


class DeviceRead:
    """A 1-D device tensor on its way to the host; ``guard``: it ends with the non-finite
    guard's snapshot (``NonFiniteGuard.snapshot``)."""

    def __init__(self, t: torch.Tensor, guard: bool = False):
        self.guard = guard
        self._event = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # [n]
            self._host.copy_(t, non_blocking=True)
            # timed: consecutive reads' events give the device's own step time
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._host = t

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    @property
    def event(self):
        """The CUDA event after this step's work (None on the CPU); complete once ``values``
        returned."""
        return self._event


def start_event():
    """A timed CUDA event recorded now: the origin of the first step's device time."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev
