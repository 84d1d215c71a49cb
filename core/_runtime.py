"""Process-level runtime choices made before torch is imported (no torch import here).

Design choices
- OpenMP's wait policy is read once, when torch's OpenMP runtime loads, so it has to be decided
  at package import. Only the CLI decides (see ``started_as_cli``); a library user's process is
  theirs to configure.
- The decision looks at what the cores are doing *now*: two samples of /proc/stat 0.1 s apart
  (the 1-minute load average lags by minutes and would punish a run started right after
  another one finished). If other processes keep at least half a core busy, spinning threads
  would steal their time slices and stall on them, so the policy becomes PASSIVE. On idle cores
  the default (spin, then sleep) is kept: it is faster per step.
  Measured on this project's 2-core machine (bench/results/default_tuning.md): idle 0.072 s/step
  default vs 0.091 passive; beside another 2-thread training 0.25 s/step default vs 0.12 passive
  (and up to 2.86 vs 0.22 in an earlier, heavier case).
- Where /proc/stat does not exist (macOS, Windows) nothing is changed.
- torch is imported only inside ``cpu_threads_info`` (called long after the decision).
"""

from __future__ import annotations

import os
import sys
import time

BUSY_CORES_THRESHOLD = 0.5
SAMPLE_S = 0.1


def started_as_cli(argv: list[str] | None = None) -> bool:
    """True for the ``sftctl`` console script and ``python -m sftctl`` (also under torchrun):
    while ``-m`` locates the package, ``sys.argv[0]`` is the string "-m"."""
    argv = sys.argv if argv is None else argv
    arg0 = argv[0] if argv else ""
    return arg0 == "-m" or os.path.basename(arg0) == "sftctl"


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None where it does not exist."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many cores other processes keep busy right now (this process sleeps meanwhile)."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(sample_s)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def choose_omp_wait_policy(environ=os.environ, argv: list[str] | None = None,
                           torch_loaded: bool | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in ``environ`` when the CLI starts on busy cores; return the
    reason (for ``sftctl doctor`` and summary.json) or None when nothing was changed."""
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded or "OMP_WAIT_POLICY" in environ or not started_as_cli(argv):
        return None
    busy = busy_cores()
    if busy is None or busy < BUSY_CORES_THRESHOLD:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return (f"other processes kept {busy:.1f} of {os.cpu_count()} cores busy at start; "
            f"spinning OpenMP threads would fight them")


def cpu_threads_info() -> dict:
    """Threads and OpenMP wait policy of this process, for ``sftctl doctor`` and summary.json."""
    import torch

    from . import OMP_WAIT_POLICY_REASON

    return {"torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_wait_policy_set_by_sftctl": OMP_WAIT_POLICY_REASON}
