"""Shared pytest fixtures (keep small; helpers append fixtures here)."""

import pytest
import torch

# Device of the op reference tests: CUDA cases run wherever a GPU is present, so the CUDA kernels
# are covered by the same tests on the GPU machine.
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request):
    return request.param
