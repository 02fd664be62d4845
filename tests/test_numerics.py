"""No exponential in the CE / KD / NDKD tails produces an fp32 denormal (issue 12, item 5), and the floored
versions equal the plain formulas to fp32 rounding on normal logits and stay correct on sharpened ones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dsom.distill.losses import ndkd, per_query_ce, target_mask, vanilla_kd
from dsom.models.chunked import chunked_cross_entropy
from dsom.numerics import EXP_FLOOR, cross_entropy, logsumexp

TINY = torch.finfo(torch.float32).tiny
LOG_TINY = math.log(TINY)  # -87.34: exp of anything below is denormal or zero


class DenormalWatch(TorchDispatchMode):
    """Records every ATen op on a ``(B, E)`` block whose exponentials would leave the fp32 normal range: an ``exp``
    output with a denormal or underflowed (zero from a finite argument) entry, and ``logsumexp`` / ``softmax`` /
    ``log_softmax`` inputs whose row spread is over 87 (their internal ``exp`` is not dispatched). Per-query
    ``(B,)`` or ``(B, 2)`` work (e.g. ``logaddexp``'s backward) costs nothing and is not watched."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []
        self.exps = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__
        if not (args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 and args[0].shape[-1] > 2):
            return out
        if name.startswith("exp") and out.dtype == torch.float32:
            self.exps += 1
            x = args[0]
            if bool(((out.abs() < TINY) & torch.isfinite(x)).any()):  # denormal, or zero from a finite argument
                self.bad.append(name)
        elif name.startswith("_log_softmax_backward"):  # computes exp(log-softmax output)
            if bool((args[1] < LOG_TINY).any()):
                self.bad.append(name)
        elif name.startswith(("logsumexp", "_softmax", "_log_softmax")) and args[0].dtype == torch.float32:
            x = args[0]
            dim = args[1][0] if isinstance(args[1], (list, tuple)) else args[1]
            spread = x.amax(dim, keepdim=True) - x
            if bool((torch.isfinite(spread) & (spread > -LOG_TINY)).any()):
                self.bad.append(name)
        return out


def _logits(B=6, E=300, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, E, generator=g, dtype=dtype) * 3 * scale


def test_logsumexp_equals_torch_on_normal_logits_in_value_and_gradient():
    x = _logits().requires_grad_()
    w = torch.rand(6, generator=torch.Generator().manual_seed(1))
    (logsumexp(x) * w).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (torch.logsumexp(x, -1) * w).sum().backward()
    torch.testing.assert_close(logsumexp(x.detach()), torch.logsumexp(x.detach(), -1), rtol=0, atol=0)
    torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", [50.0, 1e4])
def test_logsumexp_and_cross_entropy_on_sharpened_logits_match_float64(scale):
    x32 = _logits(scale=scale)
    x64 = x32.double()
    torch.testing.assert_close(logsumexp(x32).double(), torch.logsumexp(x64, -1), rtol=1e-6, atol=1e-6)
    t = torch.tensor([0, 5, 17, 299, 3, 3])
    x = x32.clone().requires_grad_()
    ce = cross_entropy(x, t)
    ce.sum().backward()
    ref = F.cross_entropy(x64, t, reduction="none")
    torch.testing.assert_close(ce.double(), ref, rtol=1e-6, atol=1e-4 * scale / 50)
    expect = torch.softmax(x64, -1) - F.one_hot(t, 300).double()
    torch.testing.assert_close(x.grad.double(), expect, rtol=1e-5, atol=1e-7)


def test_cross_entropy_with_shared_rows_equals_per_target_cross_entropy():
    s = _logits(B=4, E=50, seed=3)
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    target = torch.tensor([1, 7, 7, 0, 49, 13, 5])
    w = torch.rand(7, generator=torch.Generator().manual_seed(4))
    a = s.clone().requires_grad_()
    got = cross_entropy(a, target, rows)
    (got * w).sum().backward()
    b = s.clone().requires_grad_()
    ref = F.cross_entropy(b[rows], target, reduction="none")
    (ref * w).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    # without rows it is F.cross_entropy row by row
    c = s.clone().requires_grad_()
    cross_entropy(c, target[:4]).mean().backward()
    d = s.clone().requires_grad_()
    F.cross_entropy(d, target[:4]).backward()
    torch.testing.assert_close(c.grad, d.grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_keeps_bfloat16_scores_gradient_dtype():
    s = _logits(B=3, E=20).bfloat16().requires_grad_()
    cross_entropy(s, torch.tensor([0, 1, 2])).sum().backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def _all_losses(zt, zs, t, mask):
    return (per_query_ce(zs, t).sum() + ndkd(zt, zs, mask, 4.0).sum() + ndkd(zt, zs, mask, 1.0, mode="sum").sum()
            + vanilla_kd(zt, zs, 1.0).sum() + cross_entropy(zs, t).sum())


def _mask(t, E):
    mask = target_mask(t, E)
    mask[:, :7] = True
    return mask


def test_distillation_losses_equal_the_plain_formulas_on_normal_logits():
    """The floored losses against the same formulas with torch.logsumexp / torch.exp, value and gradient."""
    zt, zs0 = _logits(seed=5), _logits(seed=6)
    t = torch.tensor([0, 5, 17, 299, 3, 3])
    mask = _mask(t, 300)
    tau = 4.0

    def plain(zs):
        a, b = zt / tau, zs / tau
        neg = torch.finfo(torch.float32).min
        lse = torch.logsumexp
        l_in_t, l_in_s = lse(a.masked_fill(~mask, neg), -1), lse(b.masked_fill(~mask, neg), -1)
        l_out_t, l_out_s = lse(a.masked_fill(mask, neg), -1), lse(b.masked_fill(mask, neg), -1)
        n = mask.sum(-1).float()
        bt = torch.exp(l_in_t - torch.logaddexp(l_in_t, l_out_t)) / n
        bs = torch.exp(l_in_s - torch.logaddexp(l_in_s, l_out_s)) / n
        binary = bt * torch.log(bt / bs) + (1 - bt) * torch.log((1 - bt) / (1 - bs))
        p = torch.exp(a - l_out_t.unsqueeze(-1)).masked_fill(mask, 0)
        rest = (p * (a - b)).sum(-1) - l_out_t + l_out_s
        return tau**2 * (binary + rest)

    zs = zs0.clone().requires_grad_()
    got = ndkd(zt, zs, mask, tau)
    got.sum().backward()
    z2 = zs0.clone().requires_grad_()
    ref = plain(z2)
    ref.sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zs.grad, z2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(per_query_ce(zs0, t), F.cross_entropy(zs0, t, reduction="none"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [50.0, 1e3])
def test_sharpened_losses_never_produce_a_denormal_and_match_float64(scale):
    zt, zs0 = _logits(seed=7, scale=scale), _logits(seed=8, scale=scale)
    t = torch.tensor([0, 5, 17, 299, 3, 3])
    mask = _mask(t, 300)
    zs = zs0.clone().requires_grad_()
    with DenormalWatch() as watch:
        loss = _all_losses(zt, zs, t, mask)
        loss.backward()
    assert watch.exps > 5 and not watch.bad, watch.bad
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    z64 = zs0.double().requires_grad_()
    ref = _all_losses(zt.double(), z64, t, mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(zs.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)


def test_the_plain_formulas_do_produce_denormals_on_sharpened_logits():
    """The watch is not vacuous: torch's own ops trip it on the same inputs."""
    x = _logits(scale=50.0).requires_grad_()
    with DenormalWatch() as watch:
        F.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 5])).backward()
        torch.exp(x.detach() - x.detach().amax(-1, keepdim=True))
    assert watch.bad


def test_chunked_cross_entropy_sharpened_is_denormal_free_and_exact():
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(5, 8, generator=g) * 30).requires_grad_()
    table = (torch.randn(40, 8, generator=g) * 30).requires_grad_()
    t = torch.tensor([0, 3, 39, 7, 7])
    with DenormalWatch() as watch:
        out = chunked_cross_entropy(q, table, t, chunk=16)
        out.sum().backward()
    assert not watch.bad
    q64, t64 = q.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    ref = F.cross_entropy(q64 @ t64.T, t, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(table.grad.double(), t64.grad, rtol=1e-4, atol=1e-3)


def test_floor_constant_keeps_products_normal():
    assert EXP_FLOOR > LOG_TINY + math.log(1e10)  # exp(floor) times a scale >= 1e-10 is still a normal float
    assert 1e20 * math.exp(EXP_FLOOR) < 2.0**-24  # E * exp(floor) is below half an fp32 ulp of 1


def test_split_logsumexp_equals_two_masked_logsumexps():
    """One exponential per entry, each set shifted by its own maximum: the same values and gradients as a
    log-sum-exp of each set alone (float64 torch reference), with sets far apart, a full row and an empty one."""
    from dsom.numerics import split_logsumexp

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 30, generator=g, dtype=torch.float64) * 5).requires_grad_()
    keep = torch.rand(5, 30, generator=g) < 0.3
    keep[0] = True  # nothing outside
    keep[1] = False  # nothing inside
    with torch.no_grad():
        x[2, keep[2]] -= 500.0  # the inside set 500 below the outside one: a shared shift would underflow it
    lin, lout = split_logsumexp(x, keep)
    (lin[[0, 2, 3, 4]].sum() + 2 * lout[1:].sum()).backward()
    got = x.grad.clone()
    x.grad = None
    neg = -torch.inf
    want_in = torch.logsumexp(torch.where(keep, x, neg), -1)
    want_out = torch.logsumexp(torch.where(keep, neg, x), -1)
    torch.testing.assert_close(lin[[0, 2, 3, 4]], want_in[[0, 2, 3, 4]])
    torch.testing.assert_close(lout[1:], want_out[1:])
    (want_in[[0, 2, 3, 4]].sum() + 2 * want_out[1:].sum()).backward()
    torch.testing.assert_close(got, x.grad)
    assert torch.isfinite(lin[1]) and torch.isfinite(lout[0])  # empty sets: finite stand-ins (zero gradient above)


def test_split_logsumexp_weighted_mean_is_the_renormalised_expectation_outside():
    """The third result of ``split_logsumexp(x, keep, weight)``: ``sum_{not keep} softmax(x)_i weight_i`` with the
    softmax renormalised over the entries not kept, its value and gradients (to ``x`` and to ``weight``) those of a
    float64 masked-softmax reference, 0 (finite, zero gradient) for a row with nothing outside."""
    from dsom.numerics import split_logsumexp

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 25, generator=g, dtype=torch.float64) * 4).requires_grad_()
    w = torch.randn(4, 25, generator=g, dtype=torch.float64).requires_grad_()
    keep = torch.rand(4, 25, generator=g) < 0.4
    keep[0] = True  # nothing outside
    keep[1] = False  # nothing inside
    *_, mean = split_logsumexp(x, keep, w)
    c = torch.rand(4, generator=g, dtype=torch.float64)
    (mean * c).sum().backward()
    got_x, got_w = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = torch.stack([(torch.softmax(x[i][~keep[i]], -1) * w[i][~keep[i]]).sum() for i in (1, 2, 3)])
    torch.testing.assert_close(mean[1:], want)
    assert float(mean[0].detach()) == 0.0
    (want * c[1:]).sum().backward()
    torch.testing.assert_close(got_x, x.grad)
    torch.testing.assert_close(got_w, w.grad)
    assert float(got_x[0].abs().sum()) == 0.0 and float(got_w[0].abs().sum()) == 0.0
