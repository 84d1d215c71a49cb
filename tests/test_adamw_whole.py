"""sftctl.ops.adamw_split_ on whole fp32 master weights (an fp32 weight and gradient, no low half),
alone and mixed with split ones in one call, against the same float64 reference and torch's fused
AdamW as the split layout (tests/test_adamw_split.py, whose criteria and bounds apply here
unchanged: the whole layout runs the same per-element function without the decode and encode).

Also: the nonfinite flag on whole weights (inf, NaN, and a finite fp32 value that rounds to a bf16
inf under autocast), found_inf, misaligned storage, launches that mix both layouts, bad-argument
messages, opcheck, and CPU vs CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sftctl import ops
from test_adamw_split import (EXTREME_GRADS, HP, MASTER_U, MOMENT_U, OP, TINY, _lists, bits,
                              check_against_torch, check_within, extreme_inputs, make_param,
                              offset_copy, reference)


class Whole:
    """One whole fp32 parameter: fp32 weight and gradient, fp32 moments, an empty low half."""

    def __init__(self, master, grad, m, v, device):
        def own(t):  # a contiguous copy: never a view of the caller's (maybe expanded) tensor
            return t.float().to(device).clone(memory_format=torch.contiguous_format)

        self.weight, self.grad, self.m, self.v = own(master), own(grad), own(m), own(v)
        self.low = torch.empty(0, dtype=torch.int16, device=device)

    def clone(self):
        c = object.__new__(Whole)
        c.weight, c.low, c.grad = self.weight.clone(), self.low.clone(), self.grad.clone()
        c.m, c.v = self.m.clone(), self.v.clone()
        return c

    def master(self):
        return self.weight.detach().cpu()

    def state_bits(self):
        return [bits(t) for t in (self.weight, self.m, self.v)]


def make_whole(shape, device, seed, step):
    """make_param's random state with an fp32 gradient (not rounded to bf16)."""
    p = make_param(shape, device, seed, step)
    g = torch.Generator().manual_seed(seed + 7)
    grad = torch.randn(shape, generator=g) * 1e-3
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    return Whole(p.master(), grad, p.m, p.v, device)


def run(ps, *, step, weight_decay=0.0, grad_scale=None, found_inf=None, nonfinite=None, hp=HP):
    ops.adamw_split_(*_lists(ps), weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                     found_inf=found_inf, nonfinite=nonfinite, **hp)


def check_whole(before: Whole, after: Whole, *, step, weight_decay=0.0, grad_scale=None, hp=HP,
                what=""):
    """`after` (the op's result) against float64, as check_step does for a split master."""
    x64, m64, v64, m_terms, x_terms, x_floor = reference(
        before, step=step, weight_decay=weight_decay, grad_scale=grad_scale, **hp)
    check_within(after.m, m64, m_terms, MOMENT_U, TINY, f"{what} exp_avg")
    check_within(after.v, v64, v64, MOMENT_U, TINY, f"{what} exp_avg_sq")
    check_within(after.master(), x64, x_terms, MASTER_U, x_floor, f"{what} master")
    return dict(m_terms=m_terms, v_terms=v64, x_terms=x_terms, x_floor=x_floor)


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_bits(), b.state_bits()))


# ------------------------------------------------------------------------------ the step


SHAPES = [(1,), (7,), (9,), (1000003,), (33, 129)]


@pytest.mark.parametrize("grad_scale", [None, 2.5])
@pytest.mark.parametrize("step", [1, 1000])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_whole_matches_reference_and_torch(device, shape, weight_decay, step, grad_scale):
    before = make_whole(shape, device, seed=sum(shape) + step, step=step)
    after = before.clone()
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    if gs is not None:  # the gradient as a GradScaler leaves it: scaled
        before.grad = before.grad * grad_scale
        after.grad = before.grad.clone()
    run([after], step=step, weight_decay=weight_decay, grad_scale=gs)
    assert torch.equal(bits(after.grad), bits(before.grad)), "grads must not be written"
    assert after.low.numel() == 0
    kw = dict(step=step, weight_decay=weight_decay, grad_scale=grad_scale)
    terms = check_whole(before, after, **kw)
    # torch's fused step unscales an fp32 gradient in place: hand it a copy
    check_against_torch(before.clone(), after, terms, **kw)


def test_extreme_values(device):
    """Tiny, huge and signed-zero masters, zero/tiny/large gradients (fp32, one not a bf16
    value), cold and warm moments."""
    mm, gg, m, v = extreme_inputs(torch.tensor(EXTREME_GRADS + [1.2345678e-3]))
    for step, wd in [(1, 0.0), (1000, 0.1)]:
        before = Whole(mm, gg, m, v, device)
        after = before.clone()
        run([after], step=step, weight_decay=wd)
        kw = dict(step=step, weight_decay=wd)
        terms = check_whole(before, after, what=f"step {step}", **kw)
        check_against_torch(before, after, terms, what=f"step {step}", **kw)


# ------------------------------------------------------------------------------ both layouts


def test_mixed_call_equals_single_calls(device):
    """Split and whole parameters in one call (ragged sizes, empty ones, both vector paths and
    scalar tails) write the same bits as one call per parameter."""
    shapes = [(1,), (7,), (0,), (65536,), (2 * 65536 + 3,), (33, 129), (8,), (4099,), (3, 0)]
    params = []
    for i, s in enumerate(shapes):
        params.append(make_param(s, device, seed=20 + i, step=5))
        params.append(make_whole(s, device, seed=40 + i, step=5))
    singles = [p.clone() for p in params]
    before = [p.clone() for p in params]
    gs = torch.tensor(4.0, device=device)
    run(params, step=5, weight_decay=0.05, grad_scale=gs)
    for p in singles:
        run([p], step=5, weight_decay=0.05, grad_scale=gs)
    for i, (a, b, p0) in enumerate(zip(params, singles, before)):
        assert same_bits(a, b), i
        if isinstance(a, Whole) and a.weight.numel():
            check_whole(p0, a, step=5, weight_decay=0.05, grad_scale=4.0, what=f"param {i}")


def test_mixed_lists_span_several_launches(device):
    """More parameters than one CUDA launch's pointer table holds, layouts interleaved."""
    g = torch.Generator().manual_seed(6)
    sizes = torch.randint(1, 300, (131,), generator=g).tolist()
    params = [(make_whole if i % 3 else make_param)((n,), device, seed=n + i, step=2)
              for i, n in enumerate(sizes)]
    singles = [p.clone() for p in params]
    run(params, step=2, weight_decay=0.1)
    for p in singles:
        run([p], step=2, weight_decay=0.1)
    assert all(same_bits(a, b) for a, b in zip(params, singles))


@pytest.mark.parametrize("which", ["weight", "grad", "m", "v", "all"])
def test_unaligned_storage_gives_the_same_bits(device, which):
    p = make_whole((3 * 65536 + 13,), device, seed=3, step=4)
    q = p.clone()
    for name in ("weight", "grad", "m", "v"):
        if which in (name, "all"):
            setattr(q, name, offset_copy(getattr(q, name)))
    run([p], step=4, weight_decay=0.1)
    run([q], step=4, weight_decay=0.1)
    assert same_bits(p, q)


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_found_inf(device, found_inf):
    params = [make_whole((5,), device, seed=1, step=3),
              make_param((70001,), device, seed=2, step=3),
              make_whole((70001,), device, seed=3, step=3)]
    initial = [p.clone() for p in params]
    without_flag = [p.clone() for p in params]
    run(params, step=3, weight_decay=0.1, found_inf=torch.tensor([found_inf], device=device))
    run(without_flag, step=3, weight_decay=0.1)
    expected = initial if found_inf else without_flag
    assert all(same_bits(p, q) for p, q in zip(params, expected))


def test_none_stands_for_an_empty_low_half(device):
    p = make_whole((1000,), device, seed=5, step=2)
    q = p.clone()
    run([p], step=2, weight_decay=0.1)
    ops.adamw_split_([q.weight], [None], [q.grad], [q.m], [q.v], **HP, weight_decay=0.1, step=2)
    assert same_bits(p, q)


# ------------------------------------------------------------------------------ nonfinite


def test_nonfinite_flag_on_whole_weights(device):
    """The flag is set by a NaN or inf gradient, an fp32 overflow, and a finite master whose
    bf16 cast is inf (0x7F7F8000, where round-to-nearest-even goes up), wherever the element
    sits; 0x7F7F7FFF (the largest magnitude that casts to a finite bf16) leaves it as it was."""
    def bits_to_f32(u):
        return torch.tensor([u], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]

    cases = {
        "nan grad": (torch.tensor(0.5), torch.tensor(float("nan")), 1e-3, True),
        "inf grad": (torch.tensor(0.5), torch.tensor(-float("inf")), 1e-3, True),
        "fp32 overflow": (torch.tensor(-3.4e38), torch.tensor(1.0), 3e37, True),
        "casts to a bf16 inf": (bits_to_f32(0x7F7F8000), torch.tensor(0.0), 0.0, True),
        "negative, casts to a bf16 inf": (-bits_to_f32(0x7F7F8000), torch.tensor(0.0), 0.0, True),
        "largest that casts finite": (bits_to_f32(0x7F7F7FFF), torch.tensor(0.0), 0.0, False),
    }
    for name in ("casts to a bf16 inf", "largest that casts finite"):  # the premise
        master0 = cases[name][0]
        assert bool(master0.isfinite()) and bool(master0.bfloat16().isinf()) == cases[name][3]
    for name, (master0, grad0, lr, flagged) in cases.items():
        for where in (0, 13, 1000002):  # first vector, the middle, the scalar tail
            ps = [make_param((37,), device, seed=4, step=1),
                  make_whole((1000003,), device, seed=3, step=1)]
            x = ps[1].master().clone()
            x[where] = master0
            g = ps[1].grad.cpu().clone()
            g[where] = grad0
            ps[1] = Whole(x, g, ps[1].m, ps[1].v, device)
            flag = torch.zeros(1, device=device)
            run(ps, step=1, hp=dict(HP, lr=lr), nonfinite=flag)
            assert float(flag) == float(flagged), (name, where)
            finite = ps[1].weight.isfinite()
            n_bad = 1 if name in ("nan grad", "inf grad", "fp32 overflow") else 0
            assert int((~finite).sum()) == n_bad, (name, where)
    for start in (0.0, 1.0):  # a finite step keeps the flag's value and is the flagless step
        ps = [make_whole((5,), device, seed=1, step=3),
              make_whole((70001,), device, seed=2, step=3)]
        same = [p.clone() for p in ps]
        flag = torch.full((1,), start, device=device)
        run(ps, step=3, weight_decay=0.1)
        run(same, step=3, weight_decay=0.1, nonfinite=flag)
        assert float(flag) == start
        assert all(same_bits(p, q) for p, q in zip(ps, same))


# ------------------------------------------------------------------------------ bad input


BAD = {
    "fp16 weight": (lambda L: L[0].__setitem__(0, L[0][0].half()),
                    r"weights\[0\] must be bfloat16 \(split, with its low half in lows\) or "
                    r"float32 \(whole, with an empty lows entry\), got Half"),
    "whole with a low half": (lambda L: L[1].__setitem__(1, torch.zeros(5, dtype=torch.int16,
                                                                        device=L[1][1].device)),
                              r"lows\[1\] must be empty: weights\[1\] is float32"),
    "whole with a bf16 grad": (lambda L: L[2].__setitem__(1, L[2][1].bfloat16()),
                               r"grads\[1\] must be float32 \(weights\[1\] is Float\), "
                               r"got BFloat16"),
    "split with an fp32 grad": (lambda L: L[2].__setitem__(0, L[2][0].float()),
                                r"grads\[0\] must be bfloat16 \(weights\[0\] is BFloat16\), "
                                r"got Float"),
    "whole shape": (lambda L: L[3].__setitem__(1, L[3][1][:4].clone()),
                    r"exp_avgs\[1\] has shape \[4\] but weights\[1\] has shape \[5\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_argument(device, case):
    edit, pattern = BAD[case]
    ps = [make_param((4,), device, seed=1, step=1), make_whole((5,), device, seed=2, step=1)]
    saved = [p.state_bits() for p in ps]
    L = _lists(ps)
    edit(L)
    with pytest.raises(RuntimeError, match=r"sftctl::adamw_split_: .*" + pattern):
        ops.adamw_split_(*L, **HP, weight_decay=0.0, step=1)
    for p, s in zip(ps, saved):  # validation comes before any write
        assert all(torch.equal(a, b) for a, b in zip(p.state_bits(), s))


# ------------------------------------------------------------------------------ op checks


def test_opcheck_mixed(device):
    ps = [make_param((3, 5), device, seed=1, step=2), make_whole((9,), device, seed=2, step=2),
          make_whole((2, 3), device, seed=3, step=2)]
    for gs, fi, nf in [(None, None, None),
                       (torch.tensor([2.0], device=device), torch.tensor([0.0], device=device),
                        torch.tensor([0.0], device=device))]:
        args = (*_lists([p.clone() for p in ps]), 1e-3, 0.9, 0.999, 1e-8, 0.1, 2, gs, fi)
        torch.library.opcheck(OP, args, {"nonfinite": nf})


def test_parameters_that_require_grad(device):
    """fp32 nn.Parameters step like an optimizer steps them, and their version counter moves."""
    p = make_whole((300,), device, seed=2, step=1)
    before = p.clone()
    p.weight = torch.nn.Parameter(p.weight)
    version = p.weight._version
    run([p], step=1, weight_decay=0.1)
    assert p.weight._version > version
    check_whole(before, p, step=1, weight_decay=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree():
    cpu = make_whole((3 * 65536 + 5,), "cpu", seed=8, step=9)
    gpu = Whole(cpu.master(), cpu.grad, cpu.m, cpu.v, "cuda")
    before = cpu.clone()
    run([cpu], step=9, weight_decay=0.1, grad_scale=torch.tensor(2.0))
    run([gpu], step=9, weight_decay=0.1, grad_scale=torch.tensor(2.0, device="cuda"))
    _, _, v64, m_terms, x_terms, x_floor = reference(before, step=9, weight_decay=0.1,
                                                     grad_scale=2.0, **HP)
    check_within(gpu.master(), cpu.master(), x_terms, 2 * MASTER_U, x_floor, "master")
    check_within(gpu.m, cpu.m, m_terms, 2 * MOMENT_U, TINY, "exp_avg")
    check_within(gpu.v, cpu.v, v64, 2 * MOMENT_U, TINY, "exp_avg_sq")

