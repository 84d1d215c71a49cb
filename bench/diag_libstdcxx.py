"""Where would a private libstdc++ in sftctl._C come from on this machine? Prints a diagnosis.

    python3 bench/diag_libstdcxx.py

Design choices
- The extension's link is reproduced with a probe: a one-function C++ file (an integer written to
  an ostringstream, what TORCH_CHECK does) built by setuptools' build_ext with the libraries and
  library dirs of torch's CUDAExtension (CppExtension when torch or the toolkit has no CUDA), so
  the compiler driver, sysconfig's LDCXXSHARED, the environment's flags and the -L dirs are those
  of the real build; only the object files differ.
- Two links: with setup.py's LINK_ARGS minus the libstdc++ entry (the link before the fix) and
  with LINK_ARGS. Each runs with ld's --trace, so the output names the libstdc++ file the linker
  opened and any archive members it pulled, and each probe is checked with setup.py's own
  private_cxx_runtime_symbols (read from setup.py's AST, as tests/test_build.py does).
- Also printed: the environment and sysconfig variables that reach the link, the compiler's own
  libstdc++ files, and every libstdc++ file in the -L dirs of the link line.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = ("#include <sstream>\n#include <string>\n"
         "std::string sftctl_probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")

PROBE_SETUP = """
import sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
make = CUDAExtension if sys.argv.pop(1) == "cuda" else CppExtension
link = sys.argv.pop(1).split()
setup(name="probe", ext_modules=[make("probe", ["probe.cpp"], extra_link_args=link)],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
"""


def setup_py_names() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    names = {"LINK_ARGS", "PRIVATE_CXX_RUNTIME", "private_cxx_runtime_symbols"}
    body = [n for n in tree.body if isinstance(n, ast.Import)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in names for t in n.targets))
            or (isinstance(n, ast.FunctionDef) and n.name in names)]
    ns: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def probe_link(tmp: Path, kind: str, link_args: list[str], label: str, ns: dict) -> set[str]:
    out = tmp / label
    r = run([sys.executable, "probe_setup.py", kind, " ".join(link_args + ["-Wl,--trace"]), "-v",
             "build_ext", "--build-lib", str(out), "--build-temp", str(tmp / f"{label}.tmp")],
            cwd=tmp)
    lines = (r.stdout + r.stderr).splitlines()
    print(f"\n== probe link '{label}': extra_link_args {link_args}, rc={r.returncode}")
    link_line = next((ln for ln in lines if " -shared" in ln and "probe" in ln), None)
    print("link command:", link_line)
    if r.returncode != 0:
        print("\n".join(lines[-30:]))
        return set()
    stdcxx = [ln for ln in lines if "stdc++" in ln and ln is not link_line]
    members = [ln for ln in stdcxx if re.search(r"\.a\(.*\.o\)", ln)]
    print(f"ld opened for libstdc++: {sorted({re.sub(r'[(].*', '', ln) for ln in stdcxx})}; "
          f"archive members listed by the trace: {len(members)} {members[:5]}")
    so = next(out.glob("probe*.so"))
    bad = ns["private_cxx_runtime_symbols"](so)
    needed = re.findall(r"\[(.*?)\]", run(["readelf", "-d", str(so)]).stdout) \
        if shutil.which("readelf") else "readelf missing"
    count = len(bad) if bad is not None else "nm missing"
    print(f"libstdc++ internals defined in the probe: {count} {(bad or [])[:4]}")
    print(f"NEEDED: {needed}")
    return set(re.findall(r"(?:^|\s)-L(\S+)", link_line or ""))


def main() -> None:
    ns = setup_py_names()
    print("python", sys.version.split()[0], sys.executable)
    for k in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "LDFLAGS", "CFLAGS", "LIBDIR",
              "Py_ENABLE_SHARED"):
        print(f"sysconfig {k} = {sysconfig.get_config_var(k)!r}")
    for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED", "LIBRARY_PATH",
              "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "CUDNN_HOME", "GCC_EXEC_PREFIX",
              "COMPILER_PATH", "PATH"):
        if k in os.environ:
            print(f"env {k} = {os.environ[k]!r}")
    import torch
    from torch.utils import cpp_extension as ce

    cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    print(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, "
          f"CUDA_HOME {ce.CUDA_HOME}, nvcc {shutil.which('nvcc')}")
    cxx = shutil.which(os.environ.get("CXX", "c++").split()[0]) or "c++"
    print(run([cxx, "--version"]).stdout.splitlines()[0])
    for f in ("libstdc++.so", "libstdc++.a", "libstdc++_nonshared.a"):
        p = run([cxx, f"-print-file-name={f}"]).stdout.strip()
        kind = ""
        if os.path.isfile(p):
            head = Path(p).read_bytes()[:200]
            kind = "linker script: " + head.decode(errors="replace") if not head.startswith(
                b"\x7fELF") and not head.startswith(b"!<arch>") else os.path.realpath(p)
        print(f"{cxx} -print-file-name={f}: {p} {kind}")

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "probe.cpp").write_text(PROBE)
        (tmp / "probe_setup.py").write_text(PROBE_SETUP)
        kind = "cuda" if cuda else "cpu"
        old = [a for a in ns["LINK_ARGS"] if "stdc++" not in a]
        dirs = probe_link(tmp, kind, old, "without-fix", ns)
        dirs |= probe_link(tmp, kind, ns["LINK_ARGS"], "with-fix", ns)
    print("\n== libstdc++ files in the link line's -L dirs")
    for d in sorted(dirs):
        hits = sorted(p.name for p in Path(d).glob("*stdc++*")) if Path(d).is_dir() else "missing"
        print(f"{d}: {hits}")


if __name__ == "__main__":
    main()
