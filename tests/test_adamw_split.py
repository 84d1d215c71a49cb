"""sftctl.ops.adamw_split_ (AdamW on fp32 master weights split into bf16 + int16) against a float64
reference, torch's own fused AdamW and itself (batching, alignment, found_inf).

Criteria, per element (u = 2^-24, the unit roundoff of fp32):
- the reference decodes the master exactly (join_fp32), takes the same fp32 moments and the bf16
  gradient, and does the AdamW step in float64 with the float64 hyperparameters;
- fp32 arithmetic errors are bounded relative to the magnitudes each result is computed from (its
  "terms"), not to the result alone, so a cancellation (m = beta1 m + (1 - beta1) g near 0, an
  update close to the master) cannot make a correct kernel fail, while a wrong term still shows:
  moments within MOMENT_U * u of their terms, the decoded master within MASTER_U * u of its terms
  (|x|, the update and the update's own moment terms), plus an absolute floor for underflow;
- the stored (weight, low) pair is exactly split_fp32 of the master it decodes to (the encoding);
  a NaN master is stored as 0x7FC00000, so its bf16 weight is NaN as well;
- the master matches torch.optim.AdamW(fused=True) on the fp32 master and fp32(bf16 grad) within
  TORCH_U * u of the same terms (both round differently from float64: torch's CUDA kernel computes
  partly in double, its CPU kernel updates m as a lerp, nvcc contracts to fma);
- found_inf != 0 leaves every tensor bit for bit unchanged; batching several parameters into one
  call and unaligned storage give the same bits as one parameter per call.
CUDA cases run wherever a GPU is present (the `device` fixture in conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from sftctl import ops
from sftctl.ops import join_fp32, split_fp32

U = 2.0 ** -24
# Bounds in u of each result's terms. First-order worst cases of the fp32 formula: v 5.8 u (the
# unscaled gradient's rounding counts twice in g * g, plus 1 - beta2 = 0.001 rounded to fp32),
# m 3.3 u, the master about 6 u. Measured over this file on the CPU: v 3.9 u, m 2.6 u, master 2.8 u,
# master vs torch's fused AdamW 3.9 u (about 2 fp32 ulps).
MOMENT_U = 6.0
MASTER_U = 8.0
TORCH_U = 8.0
TINY = 2.0 ** -149  # fp32's smallest subnormal: underflowed products and quotients
# Betas exactly representable in fp32: torch's CUDA fused AdamW computes with fp32 betas (so its
# 1 - 0.999 is 1.3e-5 smaller than the exact one) and its CPU kernel with doubles; with these
# both agree, and the op is checked against either. SplitAdamW hands the op the betas the
# device's torch kernel uses (tests/test_master_weights.py checks that on CUDA).
HP = dict(lr=1e-3, beta1=float(torch.tensor(0.9, dtype=torch.float32)),
          beta2=float(torch.tensor(0.999, dtype=torch.float32)), eps=1e-8)
OP = torch.ops.sftctl.adamw_split_.default


# ------------------------------------------------------------------------------ helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a 16/32-bit tensor as integers (NaN-safe exact comparison), on the CPU."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


class Param:
    """One parameter of a step: (weight, low) holding the fp32 master, bf16 grad, fp32 moments."""

    def __init__(self, master, grad, m, v, device):
        w, lo = split_fp32(master.float())
        self.weight, self.low = w.to(device), lo.to(device)
        self.grad = grad.to(torch.bfloat16).to(device)
        self.m, self.v = m.float().to(device), v.float().to(device)

    def clone(self):
        c = object.__new__(Param)
        c.weight, c.low, c.grad = self.weight.clone(), self.low.clone(), self.grad.clone()
        c.m, c.v = self.m.clone(), self.v.clone()
        return c

    def master(self):
        return join_fp32(self.weight.cpu(), self.low.cpu())

    def state_bits(self):
        return [bits(t) for t in (self.weight, self.low, self.m, self.v)]


def make_param(shape, device, seed, step):
    """Random parameter state: masters around 0.02 with a spread of magnitudes, ~10% zero
    gradients, zero moments at step 1 (as a fresh optimizer has) and warm ones later."""
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(shape, generator=g) * 0.02 * torch.exp(torch.randn(shape, generator=g))
    grad = torch.randn(shape, generator=g) * 1e-3
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    if step == 1:
        m, v = torch.zeros(shape), torch.zeros(shape)
    else:
        m = torch.randn(shape, generator=g) * 1e-3
        v = (torch.randn(shape, generator=g) * 1e-3) ** 2 + 1e-9 * torch.rand(shape, generator=g)
    return Param(master, grad, m, v, device)


def run(params, *, step, weight_decay=0.0, grad_scale=None, found_inf=None, hp=HP):
    ops.adamw_split_([p.weight for p in params], [p.low for p in params],
                     [p.grad for p in params], [p.m for p in params], [p.v for p in params],
                     weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                     found_inf=found_inf, **hp)


def reference(p: Param, *, step, weight_decay, grad_scale, lr, beta1, beta2, eps):
    """float64 AdamW step from the exact inputs of `p`: (x, m, v) and their error terms."""
    x = p.master().double()
    g = p.grad.cpu().double()
    m, v = p.m.cpu().double(), p.v.cpu().double()
    if grad_scale is not None:
        g = g / float(grad_scale)
    if weight_decay != 0:
        x = x - lr * weight_decay * x
    m_terms = (beta1 * m).abs() + ((1 - beta1) * g).abs()
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g  # sums of nonnegative terms: v is its own term
    step_size = lr / (1 - beta1 ** step)
    denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
    update = step_size * m / denom
    x_new = x - update
    x_terms = x.abs() + update.abs() + step_size * m_terms / denom
    # underflow: of x itself, of m (scaled by step_size / denom) and of step_size * m (/ denom)
    x_floor = TINY * (1 + (1 + step_size) / denom)
    return x_new, m, v, m_terms, x_terms, x_floor


def check_within(actual, expected, terms, n_u, floor, what):
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    err = (a - e).abs()
    tol = n_u * U * terms + floor
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        scaled = err / (U * terms).clamp_min(1e-300)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements out of bounds; first at flat index "
            f"{i}: got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, error "
            f"{scaled.flatten()[i].item():.2f} u of its terms (bound {n_u} u); worst "
            f"{scaled.max().item():.2f} u")


def check_step(before: Param, after: Param, *, step, weight_decay=0.0, grad_scale=None, hp=HP,
               what=""):
    """`after` (the op's result) against float64 and the encoding of its own master."""
    x64, m64, v64, m_terms, x_terms, x_floor = reference(
        before, step=step, weight_decay=weight_decay, grad_scale=grad_scale, **hp)
    x = after.master()
    w2, l2 = split_fp32(x)
    assert torch.equal(bits(w2), bits(after.weight)) and torch.equal(l2, after.low.cpu()), (
        f"{what}: (weight, low) is not split_fp32 of the master it decodes to")
    check_within(after.m, m64, m_terms, MOMENT_U, TINY, f"{what} exp_avg")
    check_within(after.v, v64, v64, MOMENT_U, TINY, f"{what} exp_avg_sq")
    check_within(x, x64, x_terms, MASTER_U, x_floor, f"{what} master")
    return dict(m_terms=m_terms, v_terms=v64, x_terms=x_terms, x_floor=x_floor)


def torch_fused_adamw(p: Param, *, step, weight_decay, grad_scale, lr, beta1, beta2, eps):
    """torch.optim.AdamW(fused=True) on the fp32 master with grad = fp32(bf16 grad), state seeded
    with p's moments and step - 1 steps taken; returns (master, m, v) on the CPU."""
    device = p.weight.device
    param = torch.nn.Parameter(p.master().to(device))
    param.grad = p.grad.float()
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay, fused=True)
    opt.state[param] = {"step": torch.tensor(float(step - 1), device=device),
                        "exp_avg": p.m.clone(), "exp_avg_sq": p.v.clone()}
    if grad_scale is not None:  # how GradScaler hands its scale to a fused optimizer
        opt.grad_scale = torch.tensor([float(grad_scale)], device=device)
    opt.step()
    st = opt.state[param]
    return param.detach().cpu(), st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()


def check_against_torch(before: Param, after: Param, terms, *, step, weight_decay=0.0,
                        grad_scale=None, hp=HP, what=""):
    """`terms`: check_step's result for the same step. The moments may differ from torch's by
    both computations' rounding (torch's CPU m is a lerp), hence twice their float64 bound."""
    xt, mt, vt = torch_fused_adamw(before, step=step, weight_decay=weight_decay,
                                   grad_scale=grad_scale, **hp)
    check_within(after.master(), xt, terms["x_terms"], TORCH_U, terms["x_floor"],
                 f"{what} master vs torch fused")
    check_within(after.m, mt, terms["m_terms"], 2 * MOMENT_U, TINY, f"{what} exp_avg vs torch")
    check_within(after.v, vt, terms["v_terms"], 2 * MOMENT_U, TINY, f"{what} exp_avg_sq vs torch")


# ------------------------------------------------------------------------------ the step


SHAPES = [(1,), (7,), (1000003,), (33, 129)]


@pytest.mark.parametrize("grad_scale", [None, 2.5])
@pytest.mark.parametrize("step", [1, 1000])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_and_torch(device, shape, weight_decay, step, grad_scale):
    before = make_param(shape, device, seed=sum(shape) + step, step=step)
    after = before.clone()
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    if gs is not None:  # the gradient as a GradScaler leaves it: scaled, still bf16
        before.grad = (before.grad.float() * grad_scale).bfloat16()
        after.grad = before.grad.clone()
    run([after], step=step, weight_decay=weight_decay, grad_scale=gs)
    kw = dict(step=step, weight_decay=weight_decay, grad_scale=grad_scale)
    check_against_torch(before, after, check_step(before, after, **kw), **kw)
    assert torch.equal(bits(after.grad), bits(before.grad)), "grads must not be written"


@pytest.mark.parametrize("grad_scale", [None, 2.5])
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_found_inf(device, found_inf, grad_scale):
    params = [make_param(s, device, seed=i, step=3) for i, s in enumerate([(5,), (70001,)])]
    initial = [p.clone() for p in params]
    without_flag = [p.clone() for p in params]
    gs = None if grad_scale is None else torch.tensor([grad_scale], device=device)
    run(params, step=3, weight_decay=0.1, grad_scale=gs,
        found_inf=torch.tensor([found_inf], device=device))
    run(without_flag, step=3, weight_decay=0.1, grad_scale=gs)
    expected = initial if found_inf else without_flag  # skipped: untouched; else: the same step
    for p, q in zip(params, expected):
        assert all(torch.equal(a, b) for a, b in zip(p.state_bits(), q.state_bits()))


def test_several_tensors_in_one_call_equal_single_calls(device):
    shapes = [(1,), (7,), (0,), (3, 0), (65536,), (2 * 65536 + 3,), (33, 129), (8,), (4099,)]
    params = [make_param(s, device, seed=10 + i, step=7) for i, s in enumerate(shapes)]
    before = [p.clone() for p in params]
    singles = [p.clone() for p in params]
    gs = torch.tensor(4.0, device=device)
    run(params, step=7, weight_decay=0.05, grad_scale=gs)
    for p in singles:
        run([p], step=7, weight_decay=0.05, grad_scale=gs)
    for i, (a, b, p0) in enumerate(zip(params, singles, before)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_bits(), b.state_bits())), i
        if a.weight.numel():
            check_step(p0, a, step=7, weight_decay=0.05, grad_scale=4.0, what=f"param {i}")


def test_many_tensors_span_several_launches(device):
    """More parameters than one CUDA launch's pointer table holds, with ragged sizes."""
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 300, (130,), generator=g).tolist()
    params = [make_param((n,), device, seed=n + i, step=2) for i, n in enumerate(sizes)]
    singles = [p.clone() for p in params]
    run(params, step=2, weight_decay=0.1)
    for p in singles:
        run([p], step=2, weight_decay=0.1)
    for a, b in zip(params, singles):
        assert all(torch.equal(x, y) for x, y in zip(a.state_bits(), b.state_bits()))


def offset_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose storage starts one element off (misaligned for vectors)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("which", ["weight", "low", "grad", "m", "v", "all"])
def test_unaligned_storage_gives_the_same_bits(device, which):
    p = make_param((3 * 65536 + 13,), device, seed=3, step=4)
    q = p.clone()
    for name in ("weight", "low", "grad", "m", "v"):
        if which in (name, "all"):
            setattr(q, name, offset_copy(getattr(q, name)))
    run([p], step=4, weight_decay=0.1)
    run([q], step=4, weight_decay=0.1)
    assert all(torch.equal(x, y) for x, y in zip(p.state_bits(), q.state_bits()))


EXTREME_GRADS = [0.0, -0.0, 1e-38, -1e-30, 1e-5, -1.0, 3e3, 1e18]


def extreme_inputs(grads: torch.Tensor):
    """Every combination of tiny/huge/signed-zero masters, the given gradients and cold/warm
    moments: (masters, grads, m, v), each of shape [masters, grads, moments]."""
    masters = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.2e-38, 1e-30, -3e-12, 1.0, -1.0, 1e30,
                            -1e30, 3.0e38, torch.finfo(torch.float32).max])
    moments = [(0.0, 0.0), (1e-3, 1e-6), (-1e-30, 1e-60), (5.0, 1e30)]
    mm, gg, kk = torch.meshgrid(masters, grads, torch.arange(len(moments)).float(), indexing="ij")
    m = torch.tensor([moments[int(k)][0] for k in kk.flatten()]).view(kk.shape)
    v = torch.tensor([moments[int(k)][1] for k in kk.flatten()]).view(kk.shape)
    return mm, gg, m, v


def test_extreme_values(device):
    """Every combination of tiny/huge/signed-zero masters, zero/tiny/large gradients and cold/warm
    moments."""
    mm, gg, m, v = extreme_inputs(torch.tensor(EXTREME_GRADS).bfloat16().float())
    for step, wd in [(1, 0.0), (1000, 0.1)]:
        before = Param(mm, gg, m, v, device)
        after = before.clone()
        run([after], step=step, weight_decay=wd)
        kw = dict(step=step, weight_decay=wd)
        terms = check_step(before, after, what=f"step {step}", **kw)
        check_against_torch(before, after, terms, what=f"step {step}", **kw)


def test_split_halves_of_results_with_tied_low_bits(device):
    """Results whose low 16 bits are exactly 0x8000 round their top half away from zero."""
    u = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x7F7F8000, 0xFF7F8000])
    x = torch.where(u > 0x7FFFFFFF, u - (1 << 32), u).to(torch.int32).view(torch.float32)
    # lr 0, no decay, zero grad: the master passes through the decode -> fp32 -> encode path
    zeros = torch.zeros(x.shape)
    p = Param(x, zeros, zeros, zeros, device)
    run([p], step=1, hp=dict(HP, lr=0.0))
    w, lo = split_fp32(x)
    assert torch.equal(bits(p.weight), bits(w)) and torch.equal(p.low.cpu(), lo)
    assert torch.equal(bits(p.master()), bits(x))


def test_nan_stays_visible_in_the_weight(device):
    """A NaN or infinite gradient makes the master NaN; it is stored as the quiet NaN 0x7FC00000,
    so the bf16 weight is NaN too (CUDA's own NaN 0x7FFFFFFF would round to a weight of -0.0)."""
    grads = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-3])
    p = Param(torch.full((4,), 0.5), grads, torch.zeros(4), torch.zeros(4), device)
    run([p], step=1, weight_decay=0.1)
    x = p.master()
    assert torch.equal(bits(x)[:3], torch.full((3,), 0x7FC00000, dtype=torch.int32))
    assert bool(p.weight[:3].float().isnan().all()) and bool(x[3].isfinite())
    w, lo = split_fp32(x)
    assert torch.equal(bits(w), bits(p.weight)) and torch.equal(lo, p.low.cpu())


def test_nonfinite_flag_marks_a_non_finite_weight(device):
    """``nonfinite`` is set to 1 exactly when a written bf16 weight is inf or NaN: a NaN/inf
    gradient, a master that overflows fp32, and a finite master whose bf16 half rounds to inf
    (0x7F7F8000) each set it, wherever the element sits (vector body or scalar tail, any of
    several tensors); a finite step leaves it as it was (0 stays 0, 1 stays 1), and a step
    that found_inf skips writes nothing to it."""
    big = torch.tensor([0x7F7F8000], dtype=torch.int32).view(torch.float32)  # finite in fp32
    cases = {
        "nan grad": (torch.tensor(0.5), torch.tensor(float("nan")), 1.0),
        "inf grad": (torch.tensor(0.5), torch.tensor(float("inf")), 1.0),
        "fp32 overflow": (torch.tensor(-3.4e38), torch.tensor(1.0), 3e37),  # others: ~3e37
        "bf16 rounds to inf": (big[0], torch.tensor(0.0), 0.0),
    }
    for name, (master0, grad0, lr) in cases.items():
        for where in (0, 13, 1000002):  # first vector, the middle, the scalar tail
            ps = [make_param((1000003,), device, seed=3, step=1),
                  make_param((37,), device, seed=4, step=1)]
            m = ps[0].master()
            m[where] = master0
            g = ps[0].grad.float().cpu()
            g[where] = grad0
            ps[0] = Param(m, g, ps[0].m, ps[0].v, device)
            flag = torch.zeros(1, device=device)
            ops.adamw_split_(*_lists(ps), **dict(HP, lr=lr), weight_decay=0.0, step=1,
                             nonfinite=flag)
            assert float(flag) == 1.0, (name, where)
            assert not bool(ps[0].weight.float().isfinite()[where]), (name, where)
            assert bool(ps[0].weight.float().isfinite().sum() == 1000002), (name, where)
            # the same step with found_inf set writes nothing: weights and flag untouched
            skipped = [make_param((1000003,), device, seed=3, step=1)]
            skipped[0] = Param(m, g, skipped[0].m, skipped[0].v, device)
            before = skipped[0].state_bits()
            flag = torch.zeros(1, device=device)
            ops.adamw_split_(*_lists(skipped), **dict(HP, lr=lr), weight_decay=0.0, step=1,
                             found_inf=torch.ones(1, device=device), nonfinite=flag)
            assert float(flag) == 0.0 and all(
                torch.equal(a, b) for a, b in zip(skipped[0].state_bits(), before))
    for start in (0.0, 1.0):  # finite: the flag keeps its value, the step is the flagless one
        ps = [make_param(s, device, seed=i, step=3) for i, s in enumerate([(5,), (70001,)])]
        same = [p.clone() for p in ps]
        flag = torch.full((1,), start, device=device)
        run(ps, step=3, weight_decay=0.1)
        ops.adamw_split_(*_lists(same), **HP, weight_decay=0.1, step=3, nonfinite=flag)
        assert float(flag) == start
        for p, q in zip(ps, same):
            assert all(torch.equal(a, b) for a, b in zip(p.state_bits(), q.state_bits()))


def test_trajectory(device):
    """Ten steps in a row: each against float64 from the op's own previous state, and the whole
    run against torch's fused AdamW (fp32 master) and a float64 trajectory from the start."""
    shape = (4097,)
    g = torch.Generator().manual_seed(11)
    p = make_param(shape, device, seed=11, step=1)
    x64 = p.master().double()
    m64, v64 = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    tp = torch.nn.Parameter(p.master().to(device))
    opt = torch.optim.AdamW([tp], weight_decay=0.1, betas=(HP["beta1"], HP["beta2"]),
                            lr=HP["lr"], eps=HP["eps"], fused=True)
    lr, b1, b2, eps = HP["lr"], HP["beta1"], HP["beta2"], HP["eps"]
    worst_terms = torch.zeros(shape, dtype=torch.float64)
    for step in range(1, 11):
        grad = (torch.randn(shape, generator=g) * 1e-3 * step).bfloat16()
        p.grad = grad.to(device)
        before = p.clone()
        run([p], step=step, weight_decay=0.1)
        terms = check_step(before, p, step=step, weight_decay=0.1, what=f"step {step}")
        worst_terms = torch.maximum(worst_terms, terms["x_terms"])
        x_floor = terms["x_floor"]
        # float64 trajectory from the start
        gd = grad.double()
        x64 = x64 - lr * 0.1 * x64
        m64 = b1 * m64 + (1 - b1) * gd
        v64 = b2 * v64 + (1 - b2) * gd * gd
        x64 = x64 - lr / (1 - b1 ** step) * m64 / (v64.sqrt() / math.sqrt(1 - b2 ** step) + eps)
        tp.grad = grad.float().to(device)
        opt.step()
        # errors of earlier steps carry over (scaled by 1 - lr wd and the moment decays)
        check_within(p.master(), x64, worst_terms, step * MASTER_U, x_floor,
                     f"step {step} master vs float64 trajectory")
        # torch's CUDA kernel does parts of the step in double: ~11 u more per step (H200)
        check_within(p.master(), tp.detach().cpu(), worst_terms, (step + 1) * 1.5 * TORCH_U,
                     x_floor, f"step {step} master vs torch fused trajectory")


def test_empty_inputs(device):
    run([], step=1)
    torch.ops.sftctl.adamw_split_([], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, None, None)
    p = make_param((0,), device, seed=0, step=1)
    q = make_param((2, 0, 3), device, seed=0, step=1)
    run([p, q], step=5, weight_decay=0.1, grad_scale=torch.tensor(2.0, device=device),
        found_inf=torch.tensor([0.0], device=device))


def test_parameters_that_require_grad(device):
    """The bf16 weights are usually nn.Parameters: the wrapper steps them like an optimizer (no
    autograd error) and their version counter moves, so a stale saved tensor is caught."""
    p = make_param((300,), device, seed=2, step=1)
    before = p.clone()
    p.weight = torch.nn.Parameter(p.weight)
    version = p.weight._version
    run([p], step=1, weight_decay=0.1)
    assert p.weight._version > version
    check_step(before, p, step=1, weight_decay=0.1)


def test_number_grad_scale_is_accepted(device):
    p = make_param((100,), device, seed=4, step=2)
    q = p.clone()
    run([p], step=2, grad_scale=3.0)
    run([q], step=2, grad_scale=torch.tensor(3.0, device=device))
    assert all(torch.equal(x, y) for x, y in zip(p.state_bits(), q.state_bits()))


# ------------------------------------------------------------------------------ bad input


def _two_params(device):
    return [make_param((4,), device, seed=1, step=1), make_param((5,), device, seed=2, step=1)]


def _lists(ps):
    return ([p.weight for p in ps], [p.low for p in ps], [p.grad for p in ps],
            [p.m for p in ps], [p.v for p in ps])


BAD = {
    "weights dtype": (lambda L: L[0].__setitem__(0, L[0][0].half()),
                      {}, r"weights\[0\] must be bfloat16 \(split, .*\) or float32 "
                          r"\(whole, .*\), got Half"),
    "fp32 weight with a low half": (lambda L: L[0].__setitem__(0, L[0][0].float()),
                                    {}, r"lows\[0\] must be empty: weights\[0\] is float32"),
    "lows dtype": (lambda L: L[1].__setitem__(1, L[1][1].int()),
                   {}, r"lows\[1\] must be int16 \(weights\[1\] is BFloat16\), got Int"),
    "grads dtype": (lambda L: L[2].__setitem__(1, L[2][1].float()),
                    {}, r"grads\[1\] must be bfloat16 \(weights\[1\] is BFloat16\), "
                        r"got Float"),
    "exp_avgs dtype": (lambda L: L[3].__setitem__(0, L[3][0].bfloat16()),
                       {}, r"exp_avgs\[0\] must be float32 \(weights\[0\] is BFloat16\), "
                           r"got BFloat16"),
    "shape": (lambda L: L[4].__setitem__(1, L[4][1][:4].clone()),
              {}, r"exp_avg_sqs\[1\] has shape \[4\] but weights\[1\] has shape \[5\]"),
    "list length": (lambda L: L[2].pop(), {}, r"grads has 1 tensors but weights has 2"),
    "non-contiguous": (lambda L: L[3].__setitem__(1, torch.zeros(10, device=L[3][1].device)[::2]),
                       {}, r"exp_avgs\[1\] must be contiguous"),
    "step 0": (None, {"step": 0}, r"step must be >= 1"),
    "beta1": (None, {"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    "lr nan": (None, {"lr": float("nan")}, r"lr must be a finite number >= 0"),
    "eps negative": (None, {"eps": -1.0}, r"eps must be a finite number >= 0"),
    "weight_decay": (None, {"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0"),
    "grad_scale shape": (None, {"grad_scale": "two"}, r"grad_scale must have exactly one element"),
    "found_inf dtype": (None, {"found_inf": "f64"}, r"found_inf must be float32, got Double"),
    "nonfinite shape": (None, {"nonfinite": "two"}, r"nonfinite must have exactly one element"),
    "nonfinite is found_inf": (None, {"nonfinite": "found_inf"},
                               r"nonfinite must not be the same tensor as grad_scale or found_inf"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_argument(device, case):
    edit, overrides, pattern = BAD[case]
    ps = _two_params(device)
    saved = [p.state_bits() for p in ps]
    lists = _lists(ps)
    if edit is not None:
        edit(lists)
    kw = dict(HP, weight_decay=0.0, step=1, grad_scale=None, found_inf=None, nonfinite=None)
    kw.update(overrides)
    if kw["nonfinite"] == "two":
        kw["nonfinite"] = torch.zeros(2, device=device)
    if kw["nonfinite"] == "found_inf":
        kw["nonfinite"] = kw["found_inf"] = torch.zeros(1, device=device)
    if kw["grad_scale"] == "two":
        kw["grad_scale"] = torch.ones(2, device=device)
    if kw["found_inf"] == "f64":
        kw["found_inf"] = torch.zeros(1, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"sftctl::adamw_split_: .*" + pattern):
        ops.adamw_split_(*lists, **kw)
    for p, s in zip(ps, saved):  # validation comes before any write
        assert all(torch.equal(a, b) for a, b in zip(p.state_bits(), s))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_are_rejected():
    ps = _two_params("cuda")
    lists = _lists(ps)
    lists[3][1] = lists[3][1].cpu()
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] must be on the same device as "
                                           r"weights\[0\]"):
        ops.adamw_split_(*lists, **HP, weight_decay=0.0, step=1)
    with pytest.raises(RuntimeError, match=r"found_inf must be on the same device as weights\[0\]"):
        ops.adamw_split_(*_lists(ps), **HP, weight_decay=0.0, step=1,
                         found_inf=torch.zeros(1))


# ------------------------------------------------------------------------------ op checks


def test_opcheck(device):
    ps = [make_param((3, 5), device, seed=1, step=2), make_param((9,), device, seed=2, step=2)]
    for gs, fi, nf in [(None, None, None),
                       (torch.tensor([2.0], device=device), torch.tensor([0.0], device=device),
                        torch.tensor([0.0], device=device))]:
        args = (*_lists([p.clone() for p in ps]), 1e-3, 0.9, 0.999, 1e-8, 0.1, 2, gs, fi)
        torch.library.opcheck(OP, args, {"nonfinite": nf})


def test_compile_fullgraph(device):
    """Traced through the fake implementation and functionalized: the compiled step writes the
    same bits into the caller's tensors as the eager one."""
    torch._dynamo.reset()
    p = make_param((1000,), device, seed=9, step=3)
    q = p.clone()
    gs, fi = torch.tensor(2.0, device=device), torch.zeros(1, device=device)

    @torch.compile(fullgraph=True)
    def step(w, lo, g, m, v):
        ops.adamw_split_([w], [lo], [g], [m], [v], **HP, weight_decay=0.1, step=3, grad_scale=gs,
                         found_inf=fi)

    step(p.weight, p.low, p.grad, p.m, p.v)
    run([q], step=3, weight_decay=0.1, grad_scale=gs, found_inf=fi)
    assert all(torch.equal(x, y) for x, y in zip(p.state_bits(), q.state_bits()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree():
    """Same inputs on both devices: within the float64 bound of each other (nvcc's fma
    contraction may move an element by an ulp)."""
    cpu = make_param((3 * 65536 + 5,), "cpu", seed=8, step=9)
    gpu = Param(cpu.master(), cpu.grad.float(), cpu.m, cpu.v, "cuda")
    before = cpu.clone()
    run([cpu], step=9, weight_decay=0.1, grad_scale=torch.tensor(2.0))
    run([gpu], step=9, weight_decay=0.1, grad_scale=torch.tensor(2.0, device="cuda"))
    _, _, v64, m_terms, x_terms, x_floor = reference(before, step=9, weight_decay=0.1,
                                                     grad_scale=2.0, **HP)
    check_within(gpu.master(), cpu.master(), x_terms, 2 * MASTER_U, x_floor, "master")
    check_within(gpu.m, cpu.m, m_terms, 2 * MOMENT_U, TINY, "exp_avg")
    check_within(gpu.v, cpu.v, v64, 2 * MOMENT_U, TINY, "exp_avg_sq")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture():
    """No host sync and no allocation: the step captures into a CUDA graph, and a replay with
    found_inf set writes nothing."""
    p = make_param((70001,), "cuda", seed=6, step=3)
    eager = p.clone()
    gs = torch.tensor([2.0], device="cuda")
    found = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy kernel load) outside the capture
        run([p.clone()], step=3, grad_scale=gs, found_inf=found)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run([p], step=3, grad_scale=gs, found_inf=found)
    run([eager], step=3, grad_scale=gs)
    graph.replay()
    assert all(torch.equal(x, y) for x, y in zip(p.state_bits(), eager.state_bits()))
    found.fill_(1.0)
    graph.replay()
    assert all(torch.equal(x, y) for x, y in zip(p.state_bits(), eager.state_bits()))
