"""Loading of the compiled extension ``sftctl._C`` and a report of which kernels it has.

Design choices
- ``import sftctl`` never fails because the extension is missing: the load error is kept and
  raised, with build instructions, by whatever needs the ops (``sftctl.ops``), while
  ``extension_info()`` (used by ``sftctl doctor``) reports it.
- The ops register themselves with the dispatcher when the library loads (TORCH_LIBRARY); the
  Python module ``sftctl._C`` is empty, so loading is just an import.
- Kernel availability is read from the dispatcher (is a CUDA kernel registered?) rather than
  from build flags, so it describes the library actually loaded.
"""

from __future__ import annotations

import importlib
import sys

import torch

BUILD_HINT = (
    "build it from the source checkout with `pip install --no-build-isolation -e .` "
    "(CPU-only: SFTCTL_FORCE_CPU=1 pip install --no-build-isolation -e .); torch must be "
    "installed first because the extension compiles against it"
)

_loaded = False
_error: Exception | None = None


class ExtensionNotBuilt(ImportError):
    """The compiled extension sftctl._C is missing or does not load."""


def load_extension() -> None:
    """Import sftctl._C once (registers torch.ops.sftctl.*); raise ExtensionNotBuilt on failure."""
    global _loaded, _error
    if _loaded:
        return
    if _error is None:
        try:
            importlib.import_module("sftctl._C")
            _loaded = True
            return
        except (ImportError, OSError) as e:  # missing file, or built against another torch
            _error = e
    raise ExtensionNotBuilt(f"sftctl._C is not available ({_error}); {BUILD_HINT}") from _error


def extension_info() -> dict:
    """Which sftctl kernels this process can run: for ``sftctl doctor`` and run summaries."""
    info = {
        "built": False,
        "error": None,
        "cpu": False,
        "cpu_capability": None,
        "cuda_compiled": False,
        "cuda": False,
        "torch": torch.__version__,
    }
    try:
        load_extension()
    except ExtensionNotBuilt as e:
        info["error"] = str(e)
        return info
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info["built"] = True
    info["cpu"] = has("sftctl::cross_entropy", "CPU")
    # The CPU kernels dispatch on the capability ATen reports (ATEN_CPU_CAPABILITY overrides it);
    # anything other than AVX2/AVX512 runs the baseline copy.
    cap = torch.backends.cpu.get_cpu_capability()
    info["cpu_capability"] = cap if cap in ("AVX2", "AVX512") else "DEFAULT"
    info["cuda_compiled"] = has("sftctl::cross_entropy", "CUDA")
    info["cuda"] = info["cuda_compiled"] and torch.cuda.is_available()
    # A tuning build (SFTCTL_CE_TUNING=1) lets the SFTCTL_CE_* variables override the CUDA plan.
    info["ce_tuning"] = bool(getattr(sys.modules.get("sftctl._C"), "ce_tuning", 0))
    return info


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension registered kernels of both ops for ``device_type``
    (``"cpu"``, ``"cuda"``); False when the extension is not built."""
    try:
        load_extension()
    except ExtensionNotBuilt:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    ops = ("cross_entropy", "cross_entropy_", "scale_grad_", "sft_labels")
    return key is not None and all(has(f"sftctl::{op}", key) for op in ops)
