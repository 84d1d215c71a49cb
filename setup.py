"""Build of sftctl: the Python packages plus the compiled extension ``sftctl._C``.

Design choices
- Folders map onto one import package: ``sftctl`` <- core/, ``sftctl.plugins`` <- plugins/,
  ``sftctl.evals`` <- evals/. Nothing is importable under a generic name such as ``core``.
- The extension is built against the torch that is already installed (``pip install
  --no-build-isolation``), so no second torch is pulled into an isolated build env and no torch
  release is pinned.
- csrc/sources.txt is the single list of compiled files, read here and by CMakeLists.txt.
- CUDA sources are compiled only when the installed torch has CUDA and nvcc is found;
  ``SFTCTL_FORCE_CPU=1`` forces a CPU-only build.
  ``SFTCTL_CE_TUNING=1`` builds the CUDA launcher with its benchmark knobs (the ``SFTCTL_CE_*``
  environment variables, read at every launch; see csrc/cuda/cross_entropy.cu); never for users.
- The extension shares the process's one shared libstdc++ (the one torch uses) and never carries
  a private copy: LINK_ARGS names libstdc++.so.6 before the compiler driver's implicit -lstdc++,
  so the linker resolves every C++ runtime symbol there and pulls nothing from a libstdc++.a.
  The driver picks the archive when its search path has no libstdc++.so: on the GPU machine,
  CXX=/opt/gcc/bin/g++ (GCC 13.3), whose own lib dir holds only libstdc++.a, while the system
  runtime sits in /usr/lib/x86_64-linux-gnu as libstdc++.so.6 with no unversioned name;
  -static-libstdc++ in the flags or an -L dir with only the archive do the same. A private copy
  numbers std::locale::id on its own, so a TORCH_CHECK message that formats an integer reads
  torch's locale with the wrong ids: it crashed on the GPU machine and silently dropped the
  number on the CPU one (g++ 12, -static-libstdc++). After linking, build_ext fails the build
  if _C.so still defines libstdc++ internals
  (private_cxx_runtime_symbols, also run by tests/test_build.py).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

# Linker arguments of the extension (see the module docstring for the libstdc++ entry).
LINK_ARGS = ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])

# Non-inline definitions of libstdc++'s process-wide state (locale ids, stream init, codecvt
# facets, the exception runtime) that no user translation unit can emit: one of them defined in
# a module means it carries a private C++ runtime. (Stateless helpers such as
# std::__throw_out_of_range_fmt, which gcc-toolset builds take from libstdc++_nonshared.a, are
# deliberately not listed: two copies of them do no harm.)
PRIVATE_CXX_RUNTIME = re.compile(
    r"std::locale::(classic|locale)\(|std::locale::id::_M_id\(|std::ios_base::Init::Init\("
    r"|std::codecvt<[^()]*>::do_\w+\(|basic_ostream<[^()]*>::_M_insert<"
    r"|^__cxa_(throw|begin_catch|allocate_exception|get_globals)$|^__gxx_personality_v0$")


def private_cxx_runtime_symbols(path):
    """libstdc++ internals defined in the shared object `path` (symbol table and dynamic
    symbols); None when binutils' nm is not installed."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    found = set()
    for table in ([], ["-D"]):
        r = subprocess.run([nm, "-C", "--defined-only", *table, str(path)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nm {' '.join(table)} {path} failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            parts = line.split(" ", 2)  # address, type, demangled name
            if len(parts) == 3 and PRIVATE_CXX_RUNTIME.search(parts[2]):
                found.add(parts[2])
    return sorted(found)


def read_sources(kind):
    out = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        k, path = line.split()
        if k == kind:
            out.append(path)
    return out


def cuda_wanted():
    if os.environ.get("SFTCTL_FORCE_CPU", "") not in ("", "0"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    # torch's CUDA headers include cuBLAS; an nvcc without them (a compiler-only toolkit) cannot
    # build the binding, so build CPU-only and say so (`sftctl doctor` shows it too).
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        print(f"sftctl: {CUDA_HOME} has no cuBLAS headers: building the CPU kernels only",
              file=sys.stderr)
        return False
    return True


def extensions():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "sftctl builds its extension against the installed torch: install torch first "
            "(pip install 'torch>=2.11'), then pip install --no-build-isolation -e ."
        )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define = []
    sources = read_sources("cpu")
    if cuda_wanted():
        define.append(("SFTCTL_WITH_CUDA", None))
        if os.environ.get("SFTCTL_CE_TUNING", "") not in ("", "0"):
            # Benchmark/test builds only: the launcher then reads its SFTCTL_CE_* plan knobs.
            define.append(("SFTCTL_CE_TUNING", None))
        sources += read_sources("cuda")
        nvcc = ["-O3", "-std=c++17", "-lineinfo",
                "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
                "-Xptxas=-v" if os.environ.get("SFTCTL_PTXAS_VERBOSE") else "-Xptxas=-O3"]
        return [CUDAExtension("sftctl._C", sources, include_dirs=[str(ROOT / "csrc")],
                              define_macros=define,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=LINK_ARGS)]
    return [CppExtension("sftctl._C", sources, include_dirs=[str(ROOT / "csrc")],
                         define_macros=define, extra_compile_args={"cxx": cxx},
                         extra_link_args=LINK_ARGS)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            bad = private_cxx_runtime_symbols(path)
            if bad is None:
                print(f"sftctl: nm not found: {path} was not checked for a private libstdc++",
                      file=sys.stderr)
            elif bad:
                os.remove(path)  # it would crash on its first formatted error: never install it
                sys.exit(f"sftctl: {path} links a private copy of libstdc++ ({len(bad)} internals, "
                         f"e.g. {bad[:3]}): the link picked libstdc++.a. Look for a $CXX with "
                         "no libstdc++.so (`$CXX -print-file-name=libstdc++.so` prints a bare "
                         "name), -static-libstdc++ in LDFLAGS/CXX/LDCXXSHARED, or a libstdc++.a "
                         f"in the library dirs {self.library_dirs + ext.library_dirs}; "
                         "bench/diag_libstdcxx.py shows which file the linker took")

    return {"build_ext": BuildExt}


# Optional dependencies. lora: the built-in lora plugin (peft); the tests run that plugin, so
# test brings peft too; all: every extra.
# trackers: the tensorboard, wandb and mlflow tracker plugins (--report-to); mlflow-skinny is
# MLflow's client without its server (sftctl logs to a file store or a given tracking URI).
TRACKERS = ["tensorboard>=2.14", "wandb>=0.19", "mlflow-skinny>=2.16"]
EXTRAS = {"lora": ["peft>=0.13"],
          "trackers": TRACKERS,
          "test": ["pytest", "pytest-timeout", "hypothesis", "expecttest", "peft>=0.13",
                   "jsonschema>=4.18", *TRACKERS]}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


setup(
    name="sftctl",
    version="0.1.0",
    description="Supervised fine-tuning with fused, exact fp32 loss kernels, plugins and post-train reports",
    python_requires=">=3.10",
    package_dir={"sftctl": "core", "sftctl.plugins": "plugins", "sftctl.evals": "evals"},
    packages=["sftctl", "sftctl.ops", "sftctl.data", "sftctl.training", "sftctl.run",
              "sftctl.plugins", "sftctl.plugins.alpaca", "sftctl.plugins.chat", "sftctl.plugins.lora",
              "sftctl.plugins.trackers", "sftctl.plugins.model_card", "sftctl.evals"],
    package_data={"sftctl": ["py.typed"], "sftctl.plugins.alpaca": ["*.yaml", "*.json"],
                  "sftctl.plugins.chat": ["*.yaml", "*.json"],
                  "sftctl.evals": ["templates/*", "tasks/*", "report.schema.json"]},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    install_requires=[
        "torch>=2.11",
        "transformers>=4.56",
        "safetensors",
        "accelerate",
        "datasets>=3",
        "pluggy>=1.5",
        "PyYAML",
        "tqdm",
        "matplotlib",
        "lm-eval>=0.4.8",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["sftctl = sftctl.run.cli:main"]},
)
