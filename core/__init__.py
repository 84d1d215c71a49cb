"""sftctl: supervised fine-tuning of Hugging Face causal LMs with fused, exact fp32 loss kernels.

Design choices
- ``import sftctl`` works even when the compiled extension is missing, so ``sftctl doctor`` can
  say so; ``sftctl.ops`` then raises an ImportError that tells how to build.
- The package is layered (docs/architecture.md): ``sftctl.ops`` (fused ops), ``sftctl.data``,
  ``sftctl.training``, ``sftctl.run`` (config, plugin manager, CLI); ``sftctl.hookspecs`` is the
  plugin API, and this module re-exports what plugin authors import.
- When the extension loads, ``ops`` is imported eagerly: its fake and autograd registrations
  must be in place before anyone calls ``torch.ops.sftctl.*`` directly.
- Started as the CLI (``sftctl ...``, ``python -m sftctl``, ``torchrun -m sftctl``) on a machine
  whose cores other processes are using right now, the package sets ``OMP_WAIT_POLICY=PASSIVE``
  before torch is imported (``_runtime.choose_omp_wait_policy``): OpenMP's spin-waiting threads
  then fight the other work (a 2-thread CPU step measured 2-40x slower), while on idle cores
  spinning is 20-35% faster per step, so it stays. A user's own setting wins; a library import
  leaves the environment alone.
"""

from __future__ import annotations

import importlib

from ._runtime import choose_omp_wait_policy

# why sftctl set OMP_WAIT_POLICY (None: it did not); shown by `sftctl doctor` and summary.json
OMP_WAIT_POLICY_REASON = choose_omp_wait_policy()

from ._ext import ExtensionNotBuilt, extension_info, load_extension

__version__ = "0.1.0"

try:
    load_extension()
except ExtensionNotBuilt:
    pass  # reported by extension_info(); raised again on first use of sftctl.ops
else:
    from . import ops  # noqa: F401


def __getattr__(name):
    # Reached only when the eager import above was skipped: importing raises the build hint.
    if name == "ops":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "extension_info", "ops", "ExtensionNotBuilt"]

# Plugin API (what plugin authors import; see docs/plugins.md): the hook marker and the specs
# that registration hooks accept.
from .run.config import ConfigOption  # noqa: E402
from .errors import ConfigError, DataError, SftctlError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .data.formats import DatasetFormat, RecordError, Segment  # noqa: E402
from .run.benchmarks import BenchmarkSpec, ReportSection  # noqa: E402
from .training.optim import OptimizerSpec, SchedulerSpec  # noqa: E402
from .training.trackers import TrackerSpec  # noqa: E402

__all__ += ["hookimpl", "ConfigOption", "DatasetFormat", "OptimizerSpec", "SchedulerSpec",
            "BenchmarkSpec", "ReportSection", "TrackerSpec", "Segment", "RecordError", "SftctlError",
            "ConfigError", "DataError"]
