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
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


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
        sources += read_sources("cuda")
        nvcc = ["-O3", "-std=c++17", "-lineinfo",
                "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
                "-Xptxas=-v" if os.environ.get("SFTCTL_PTXAS_VERBOSE") else "-Xptxas=-O3"]
        return [CUDAExtension("sftctl._C", sources, include_dirs=[str(ROOT / "csrc")],
                              define_macros=define,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=["-fopenmp"])]
    return [CppExtension("sftctl._C", sources, include_dirs=[str(ROOT / "csrc")],
                         define_macros=define, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="sftctl",
    version="0.1.0",
    description="Supervised fine-tuning with fused, exact fp32 loss kernels, plugins and post-train reports",
    python_requires=">=3.10",
    package_dir={"sftctl": "core", "sftctl.plugins": "plugins", "sftctl.evals": "evals"},
    packages=["sftctl", "sftctl.plugins", "sftctl.evals"],
    package_data={"sftctl": ["configs/*.yaml", "configs/*.json", "py.typed"],
                  "sftctl.evals": ["templates/*", "tasks/*"]},
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
    extras_require={"test": ["pytest", "hypothesis", "expecttest"]},
    entry_points={"console_scripts": ["sftctl = sftctl.cli:main"]},
)
