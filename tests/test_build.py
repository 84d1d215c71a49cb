"""The build: setup.py and CMake compile the same sources; the extension loads and registers the
ops; a missing extension gives a clear, actionable error."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def setup_py_sources(kind: str) -> list[str]:
    """Run setup.py's own read_sources (extracted by AST, so setup() itself is not executed)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "read_sources")
    ns = {"ROOT": REPO}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns["read_sources"](kind)


def test_setup_py_and_cmake_compile_the_same_cpu_sources(tmp_path):
    want = setup_py_sources("cpu")
    assert want and all((REPO / p).is_file() for p in want), want
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(tmp_path / "b")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"sftctl cpu sources \(csrc/sources.txt\): (.*)", r.stdout)
    assert m, r.stdout[-2000:]
    got = [str(Path(p).resolve().relative_to(REPO)) for p in m.group(1).split(";")]
    assert got == want


def test_every_cpu_source_file_is_listed():
    listed = set(setup_py_sources("cpu"))
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "csrc" / "cpu").glob("*.cpp")}
    assert on_disk <= listed, f"not compiled: {sorted(on_disk - listed)}"
    assert "csrc/binding.cpp" in listed
    cuda = setup_py_sources("cuda")
    assert all(p.endswith(".cu") and (REPO / p).is_file() for p in cuda), cuda


def test_import_registers_ops_in_a_fresh_process():
    code = ("import sftctl, torch; print(torch.ops.sftctl.cross_entropy); "
            "print(sorted(sftctl.extension_info().items()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "sftctl.cross_entropy" in r.stdout and "('built', True)" in r.stdout


def test_missing_extension_gives_build_hint():
    """With sftctl._C unimportable, `import sftctl` still works (doctor can report it) and the ops
    module fails with the command that builds the extension."""
    code = "\n".join([
        "import sys",
        "sys.modules['sftctl._C'] = None  # makes `import sftctl._C` raise ImportError",
        "import sftctl",
        "info = sftctl.extension_info()",
        "assert not info['built'] and 'pip install --no-build-isolation' in info['error'], info",
        "try:",
        "    sftctl.ops",
        "except ImportError as e:",
        "    print('HINT:', e)",
        "else:",
        "    raise SystemExit('sftctl.ops imported without the extension')",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "HINT: sftctl._C is not available" in r.stdout
    assert "pip install --no-build-isolation -e ." in r.stdout



def setup_py_runtime_check() -> dict:
    """setup.py's LINK_ARGS and private_cxx_runtime_symbols (extracted by AST, like read_sources,
    so the test checks exactly what the build checks)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    names = {"LINK_ARGS", "PRIVATE_CXX_RUNTIME", "private_cxx_runtime_symbols"}
    body = [n for n in tree.body if isinstance(n, ast.Import)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in names for t in n.targets))
            or (isinstance(n, ast.FunctionDef) and n.name in names)]
    ns: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    assert names <= ns.keys(), sorted(names - ns.keys())
    return ns


def test_extension_shares_the_process_libstdcxx():
    """_C.so carries no private copy of libstdc++: with one, its own std::locale::id numbering met
    torch's locale and the first TORCH_CHECK message that formatted an integer crashed (GPU
    machine, g++ 13). The same error must come back as a RuntimeError, in a fresh process so a
    crash fails this test instead of ending the run."""
    import importlib.util

    spec = importlib.util.find_spec("sftctl._C")
    assert spec is not None and spec.origin, "sftctl._C is not built"
    bad = setup_py_runtime_check()["private_cxx_runtime_symbols"](spec.origin)
    if bad is None:
        pytest.skip("binutils' nm is not installed")
    assert bad == [], f"{spec.origin} defines libstdc++ internals: {bad[:10]}"
    readelf = shutil.which("readelf")
    if readelf is not None:
        dyn = subprocess.run([readelf, "-d", spec.origin], capture_output=True, text=True).stdout
        assert "[libstdc++.so.6]" in dyn, dyn

    code = "\n".join([
        "import torch, sftctl",
        "try:",
        "    torch.ops.sftctl.cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]),",
        "        torch.tensor(2.0), None, -100, 2, 0.0, 0.0, 0.0, False, False, False)",
        "except RuntimeError as e:",
        "    print('ERR', e)",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, f"rc={r.returncode}: {r.stderr[-2000:]}"
    assert "got reduction 2" in r.stdout, r.stdout


def test_link_args_keep_a_static_libstdcxx_out(tmp_path):
    """The check finds a private libstdc++ (a probe linked with -static-libstdc++), and setup.py's
    LINK_ARGS keep it out even when -static-libstdc++ is on the link line too."""
    ns = setup_py_runtime_check()
    cxx = shutil.which("g++")
    if cxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    if shutil.which("nm") is None:
        pytest.skip("binutils' nm is not installed")
    src = tmp_path / "probe.cpp"
    src.write_text("#include <sstream>\n#include <string>\n"
                   "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
    obj = tmp_path / "probe.o"
    r = subprocess.run([cxx, "-O2", "-fPIC", "-c", str(src), "-o", str(obj)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr

    def link(name, args):
        out = tmp_path / name
        r = subprocess.run([cxx, "-shared", str(obj), "-o", str(out), *args], capture_output=True,
                           text=True)
        return out, r

    static, r = link("static.so", ["-static-libstdc++"])
    if r.returncode != 0:  # no libstdc++.a, or one built without -fPIC
        pytest.skip(f"this toolchain cannot put libstdc++.a in a shared object: {r.stderr[-300:]}")
    found = ns["private_cxx_runtime_symbols"](static)
    assert any("_M_insert<long>" in s for s in found), found
    fixed, r = link("fixed.so", [*ns["LINK_ARGS"], "-static-libstdc++"])
    assert r.returncode == 0, r.stderr
    assert ns["private_cxx_runtime_symbols"](fixed) == []
