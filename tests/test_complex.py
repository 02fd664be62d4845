import pytest
import torch

from dsom.models.complex import ComplEx, regularizer
from dsom.models.interaction import complex_modulus
from dsom.models.products import matmul_scores


def _model(E=30, R2=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = ComplEx(E, R2, d, init_scale=1.0, generator=g)
    return m


def test_single_triple_scores_equal_the_1n_column():
    m = _model()
    h = torch.tensor([0, 3, 7, 7, 29])
    r = torch.tensor([0, 5, 2, 2, 1])
    t = torch.tensor([1, 4, 7, 8, 0])
    full = m.score_all(h, r, precision="fp32")
    single = m.score_triples(h, r, t)
    assert full.shape == (5, 30)
    torch.testing.assert_close(full[torch.arange(5), t], single, rtol=1e-5, atol=1e-5)


def test_scores_match_torch_complex_arithmetic():
    """Independent computation: Re(<h, r, conj(t)>) with torch's complex dtype."""
    m = _model()
    d = m.rank
    ent = torch.complex(m.entity[:, :d], m.entity[:, d:]).detach()
    rel = torch.complex(m.relation[:, :d], m.relation[:, d:]).detach()
    h, r = torch.tensor([2, 5]), torch.tensor([1, 4])
    expected = torch.real((ent[h] * rel[r]) @ ent.conj().T)
    torch.testing.assert_close(m.score_all(h, r).detach(), expected, rtol=1e-5, atol=1e-4)


def test_chunked_candidates_equal_slices_of_full_scores():
    m = _model()
    h, r = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    full = m.score_all(h, r)
    torch.testing.assert_close(m.score_all(h, r, start=10, stop=17), full[:, 10:17])


def test_bf16_scores_are_close_to_fp32_and_float32_typed():
    m = _model(d=32)
    h, r = torch.arange(10), torch.arange(10) % 6
    a = m.score_all(h, r, precision="fp32")
    b = m.score_all(h, r, precision="bf16")
    assert b.dtype == torch.float32
    assert not torch.equal(a, b)  # really computed in lower precision
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05 * a.abs().max().item())


def test_bf16_gradients_reach_fp32_parameters():
    m = _model()
    loss = m.score_all(torch.tensor([0, 1]), torch.tensor([0, 1]), precision="bf16").sum()
    loss.backward()
    assert m.entity.grad is not None and m.entity.grad.dtype == torch.float32
    assert m.entity.grad.abs().sum() > 0


def test_n3_factors_and_penalty_closed_form():
    m = _model()
    h, r, t = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    fh, fr, ft = m.factors(h, r, t)
    d = m.rank
    expect_h = torch.sqrt(m.entity[h, :d] ** 2 + m.entity[h, d:] ** 2)
    torch.testing.assert_close(fh, expect_h)
    torch.testing.assert_close(complex_modulus(m.relation[r]), fr)
    pen = regularizer("n3", (fh, fr, ft), 0.01)
    manual = 0.01 * (fh.pow(3).sum() + fr.pow(3).sum() + ft.pow(3).sum()) / 2
    torch.testing.assert_close(pen, manual)
    torch.testing.assert_close(regularizer("f2", (fh, fr, ft), 0.5, batch=4),
                               0.5 * (fh.pow(2).sum() + fr.pow(2).sum() + ft.pow(2).sum()) / 4)
    assert regularizer("none", (fh, fr, ft), 0.01) is None and regularizer("n3", (fh, fr, ft), 0.0) is None
    with pytest.raises(ValueError, match="unknown regularizer 'l1'"):
        regularizer("l1", (fh, fr, ft), 0.01)


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError):
        matmul_scores(torch.zeros(1, 2), torch.zeros(3, 2), precision="fp8")


def test_n3_gradient_is_finite_for_exactly_zero_rows():

    x = torch.zeros(2, 6, requires_grad=True)
    (complex_modulus(x) ** 3).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_stacked_interaction_equals_one_model_at_a_time():
    """The one ComplEx scoring function: M stacked tables score exactly as M separate models, and the single-triple
    path agrees with the 1-vs-all row (LibKGE's check), for one model and for a stack."""
    from dsom.models import interaction

    g = torch.Generator().manual_seed(3)
    M, E, R, d = 3, 11, 4, 5
    ent, rel = torch.randn(M, E, 2 * d, generator=g), torch.randn(M, R, 2 * d, generator=g)
    h, r, t = torch.tensor([0, 5, 10, 3]), torch.tensor([1, 3, 0, 2]), torch.tensor([2, 2, 9, 3])
    stacked = interaction.score_all(ent, rel, h, r)
    assert stacked.shape == (M, 4, E)
    for m in range(M):
        one = interaction.score_all(ent[m], rel[m], h, r)
        torch.testing.assert_close(stacked[m], one, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(interaction.score_triples(ent[m], rel[m], h, r, t), one[torch.arange(4), t],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(interaction.score_all(ent[m], rel[m], h, r, start=4, stop=9), one[:, 4:9])
        for a, b in zip(interaction.factors(ent, rel, h, r, t), interaction.factors(ent[m], rel[m], h, r, t)):
            torch.testing.assert_close(a[m], b)
    torch.testing.assert_close(interaction.score_triples(ent, rel, h, r, t),
                               stacked.gather(2, t.expand(M, 4).unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    # an independent computation with complex numbers: Re(<h * r, conj(t)>)
    c = torch.complex(ent[..., :d].double(), ent[..., d:].double())
    cr = torch.complex(rel[..., :d].double(), rel[..., d:].double())
    ref = ((c[:, h] * cr[:, r]).unsqueeze(2) * c.conj().unsqueeze(1)).sum(-1).real
    torch.testing.assert_close(stacked.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,stop", [(0, None), (7, 29)])
def test_scores_without_autograd_in_the_column_layout_equal_complex_arithmetic(start, stop):
    """Evaluation's scores (no autograd, fp32: the ``(N, B)`` column products, 70 queries padded to 72) equal
    Re(<h, r, conj(t)>) in complex128; with autograd on, the same scores keep their graph."""
    m = _model(E=40, R2=6, d=8)
    d = m.rank
    ent = torch.complex(m.entity[:, :d].double(), m.entity[:, d:].double()).detach()
    rel = torch.complex(m.relation[:, :d].double(), m.relation[:, d:].double()).detach()
    g = torch.Generator().manual_seed(3)
    h, r = torch.randint(0, 40, (70,), generator=g), torch.randint(0, 6, (70,), generator=g)
    expected = torch.real((ent[h] * rel[r]) @ ent[start:stop].conj().T).float()
    with torch.no_grad():
        got = m.score_all(h, r, start=start, stop=stop)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    live = m.score_all(h, r, start=start, stop=stop)
    assert live.requires_grad
    torch.testing.assert_close(live.detach(), expected, rtol=1e-5, atol=1e-5)
    live.sum().backward()
    assert m.entity.grad is not None and m.entity.grad.abs().sum() > 0
