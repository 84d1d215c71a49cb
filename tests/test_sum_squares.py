"""sftctl.ops.sum_squares (the squared global 2-norm of a list of tensors, for gradient
clipping) against a float64 reference of the same values.

Criteria: elements are widened to fp32 and squared in fp32; a CUDA thread sums at most 256 such
squares of a chunk in fp32 before the fp64 carry, so the result is within 300 u of the float64
sum (u = 2^-24; worst case ~257 u, independent of the element count); the CPU sums chunks in
fp64 and rounds once (within 1 u). Also: every dtype and mixes of them, sizes around the
vector width and the chunk size, more tensors than one launch takes, misaligned storage,
inf/NaN propagation, determinism, bad-argument messages, opcheck, and the trainer's
``total_norm_fp32`` on top of it.
"""

from __future__ import annotations

import pytest
import torch

from sftctl import ops

U = 2.0 ** -24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 1000, 65535, 65536, 65537, 3 * 65536 + 5]


def reference(tensors) -> float:
    return sum(float(t.detach().cpu().double().square().sum()) for t in tensors)


def check(got: torch.Tensor, tensors, device) -> None:
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == device
    want = reference(tensors)
    bound = (1.0 if device == "cpu" else 300.0) * U * want
    assert abs(float(got) - want) <= bound, (float(got), want, abs(float(got) - want) / (U * want))


def rand(n, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_one_tensor(device, dtype, n):
    t = rand(n, dtype, device, seed=n, scale=3.0)
    check(ops.sum_squares([t]), [t], device)


def test_mixed_dtypes_shapes_and_magnitudes(device):
    """A gradient-like list: bf16 matrices, fp32 vectors and an fp16 tensor, magnitudes from 1e-6
    to 1e3, ragged sizes (vector bodies and scalar tails)."""
    tensors = [rand((33, 129), torch.bfloat16, device, 1, 1e-3),
               rand((2048,), torch.float32, device, 2, 1e-6),
               rand((7, 3, 5), torch.float16, device, 3, 10.0),
               rand((131075,), torch.bfloat16, device, 4, 1e3),
               rand((1,), torch.float32, device, 5),
               torch.zeros(0, device=device),
               rand((65536 * 2 + 9,), torch.float32, device, 6, 0.5)]
    check(ops.sum_squares(tensors), tensors, device)


def test_many_tensors_span_several_launches(device):
    g = torch.Generator().manual_seed(8)
    sizes = torch.randint(1, 500, (250,), generator=g).tolist()
    tensors = [rand(n, DTYPES[i % 3], device, seed=i) for i, n in enumerate(sizes)]
    check(ops.sum_squares(tensors), tensors, device)


def offset_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose storage starts one element off (no 16-byte vectors)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_storage(device, dtype):
    t = rand(3 * 65536 + 13, dtype, device, seed=3)
    m = offset_copy(t)
    assert m.data_ptr() % 16 != 0
    check(ops.sum_squares([m]), [t], device)


def test_deterministic(device):
    tensors = [rand(1_000_003, torch.bfloat16, device, 1), rand(70001, torch.float32, device, 2)]
    first = ops.sum_squares(tensors)
    for _ in range(3):
        assert torch.equal(ops.sum_squares(tensors).view(torch.int32), first.view(torch.int32))


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 13, 1000002])  # first vector, the middle, the scalar tail
def test_non_finite_elements_propagate(device, bad, where):
    t = rand(1000003, torch.bfloat16, device, seed=4)
    t[where] = float(bad)
    other = rand(100, torch.float32, device, seed=5)
    got = float(ops.sum_squares([other, t]))
    assert (got != got) if bad == "nan" else got == float("inf")


def test_non_contiguous_input_is_read_through_a_copy(device):
    base = rand((64, 66), torch.float32, device, seed=6)
    view = base[:, 1:65]
    assert not view.is_contiguous()
    assert torch.equal(ops.sum_squares([view]), ops.sum_squares([view.contiguous()]))


def test_empty_list_is_zero():
    z = ops.sum_squares([])
    assert float(z) == 0.0 and z.dtype == torch.float32


def test_tensors_that_require_grad(device):
    w = torch.nn.Parameter(rand(300, torch.float32, device, seed=7))
    check(ops.sum_squares([w]), [w], device)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case,pattern", [
    ("int", r"tensors\[1\] must be float32, bfloat16 or float16, got Int"),
    ("strided", r"tensors\[0\] must be contiguous"),
    ("empty", r"tensors is empty"),
])
def test_bad_input_names_the_argument(device, case, pattern):
    ok = rand(10, torch.float32, device, seed=1)
    args = {"int": [ok, torch.ones(3, dtype=torch.int32, device=device)],
            "strided": [rand(20, torch.float32, device, seed=2)[::2]],
            "empty": []}[case]
    with pytest.raises(RuntimeError, match=r"sum_squares.*" + pattern):
        torch.ops.sftctl.sum_squares(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_are_rejected():
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be on the same device as "
                                           r"tensors\[0\]"):
        torch.ops.sftctl.sum_squares([torch.ones(3, device="cuda"), torch.ones(3)])


def test_opcheck(device):
    tensors = [rand((3, 5), torch.float32, device, 1), rand((9,), torch.bfloat16, device, 2)]
    torch.library.opcheck(torch.ops.sftctl.sum_squares.default, (tensors,))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    tensors = [rand(1000, torch.bfloat16, device, 1), rand(77, torch.float32, device, 2)]

    @torch.compile(fullgraph=True)
    def norm(a, b):
        return ops.sum_squares([a, b]).sqrt()

    assert torch.equal(norm(*tensors), ops.sum_squares(tensors).sqrt())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree():
    tensors = [rand(1_000_003, torch.bfloat16, "cpu", 1), rand(70001, torch.float32, "cpu", 2)]
    cpu = float(ops.sum_squares(tensors))
    cuda = float(ops.sum_squares([t.cuda() for t in tensors]))
    assert abs(cpu - cuda) <= 300 * U * reference(tensors)


# ------------------------------------------------------------------------------ the trainer's norm


def test_total_norm_fp32_is_the_float64_norm(device):
    from sftctl.training.master_weights import total_norm_fp32

    grads = [rand((257, 33), torch.bfloat16, device, 1, 1e-3), rand((4096,), torch.float32,
                                                                     device, 2, 1e-2)]
    got = total_norm_fp32(grads)
    want = reference(grads) ** 0.5
    assert got.dtype == torch.float32 and got.device.type == device
    assert float(got) == pytest.approx(want, rel=200 * U)
