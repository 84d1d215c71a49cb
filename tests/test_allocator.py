"""--cuda-allocator: expandable segments by default on CUDA, the user's PYTORCH_CUDA_ALLOC_CONF
respected, torch's default on request. The allocator setting is process-wide, so the CUDA cases
run in fresh interpreters and look at the segments the allocator really made."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sftctl.training import allocator

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROBE = """
import json, torch
from sftctl.training import allocator
info = allocator.configure({mode!r}, torch.device("cuda"))
x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
segs = torch.cuda.memory.memory_snapshot()
print(json.dumps({{"info": info, "expandable": sorted({{bool(s.get("is_expandable")) for s in segs}})}}))
"""


def test_cpu_runs_leave_the_allocator_alone_and_bad_modes_are_refused():
    assert allocator.configure("auto", torch.device("cpu"))["mode"] == "none"
    with pytest.raises(ValueError, match="cuda_allocator"):
        allocator.configure("huge", torch.device("cpu"))


def _probe(mode: str, env: str | None) -> dict:
    e = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    if env is not None:
        e[allocator.ENV] = env
    r = subprocess.run([sys.executable, "-c", PROBE.format(mode=mode)], env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@_CUDA
@pytest.mark.parametrize("mode, env, want_mode, want_expandable", [
    ("auto", None, "expandable", [True]),
    ("expandable", None, "expandable", [True]),
    ("torch", None, "torch", [False]),
    ("auto", "expandable_segments:False", "env", [False]),
    ("expandable", "expandable_segments:False", "expandable", [True]),
])
def test_cuda_segments_follow_the_mode(mode, env, want_mode, want_expandable):
    got = _probe(mode, env)
    assert got["info"]["mode"] == want_mode, got
    assert got["expandable"] == want_expandable, got
