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

