import torch

from dsom.models.complex import ComplEx
from dsom.models.teachers import ModalityTeachers, TeacherView


def _teachers(E=20, R2=6, d=4):
    g = torch.Generator().manual_seed(0)
    feats = {"text": torch.randn(E, 7, generator=g), "numeric": torch.randn(E, 3, generator=g)}
    return ModalityTeachers(E, R2, d, feats, init_scale=0.5, scale=20.0, generator=g), feats


def test_each_teacher_equals_a_standalone_complex():
    t, feats = _teachers()
    h, r = torch.tensor([0, 5, 19]), torch.tensor([1, 2, 5])
    scores = t.score_all(h, r)
    assert scores.shape == (3, 3, 20)
    tables = [t.structure.detach(), feats["text"] @ t.projections[0].detach() / 20,
              feats["numeric"] @ t.projections[1].detach() / 20]
    for m, table in enumerate(tables):
        ref = ComplEx(20, 6, 4)
        with torch.no_grad():
            ref.entity.copy_(table)
            ref.relation.copy_(t.relations[m])
        torch.testing.assert_close(scores[m], ref.score_all(h, r).detach(), rtol=1e-5, atol=1e-6)


def test_teacher_avg_is_the_mean_of_logits_and_views_select_teachers():
    t, _ = _teachers()
    h, r = torch.arange(5), torch.arange(5) % 6
    all_scores = t.score_all(h, r).detach()
    torch.testing.assert_close(TeacherView(t).score_all(h, r), all_scores.mean(0))
    torch.testing.assert_close(TeacherView(t, [2]).score_all(h, r), all_scores[2])
    torch.testing.assert_close(TeacherView(t).score_all(h, r, start=3, stop=9), all_scores.mean(0)[:, 3:9])


def test_gradients_reach_projections_but_not_features():
    t, _ = _teachers()
    t.score_all(torch.tensor([0, 1]), torch.tensor([0, 1])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters())
    assert not t.features_0.requires_grad
    names = {n for n, _ in t.named_parameters()}
    assert not any("features" in n for n in names)


def test_parameter_count_matches_the_formula_and_the_paper():
    t, _ = _teachers()
    assert t.num_parameters() == ModalityTeachers.parameter_count(20, 6, 4, [7, 3])
    # SPEC §10: DB15K, d = 2000, F_v = F_d = 768 -> 64,208,000 teacher parameters (paper: 64.2M)
    assert ModalityTeachers.parameter_count(12842, 558, 2000, [768, 768]) == 64_208_000


def test_factors_shapes():
    t, _ = _teachers()
    tables = t.entity_tables()
    fh, fr, ft = t.factors(tables, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    assert fh.shape == fr.shape == ft.shape == (3, 2, 4)


def test_db15k_sized_module_has_the_papers_parameter_count():
    feats = {"image": torch.zeros(12842, 768), "text": torch.zeros(12842, 768)}
    t = ModalityTeachers(12842, 2 * 279, 2000, feats)
    assert t.num_parameters() == 64_208_000


def test_frozen_teachers_bf16_cache_gives_the_same_logits():
    """FrozenTeachers keeps its tables cast to bf16 once; the logits equal the uncached bf16 product exactly, for the
    whole table and for a slice of candidates, and a second call reuses the cast."""
    import dsom.models.interaction as interaction
    from dsom.models.teachers import FrozenTeachers

    g = torch.Generator().manual_seed(3)
    frozen = FrozenTeachers(["structure", "text"], torch.randn(2, 30, 8, generator=g), torch.randn(2, 6, 8, generator=g))
    h, r = torch.randint(0, 30, (7,), generator=g), torch.randint(0, 6, (7,), generator=g)
    want = interaction.score_all(frozen.tables, frozen.relations, h, r, "bf16")
    assert torch.equal(frozen.score_all(h, r, "bf16"), want)
    cached = frozen._bf16_tables
    assert cached is not None and cached.dtype == torch.bfloat16
    assert torch.equal(frozen.score_all(h, r, "bf16", 5, 20), want[:, :, 5:20])
    assert frozen._bf16_tables is cached
    assert torch.equal(frozen.score_all(h, r, "fp32"), interaction.score_all(frozen.tables, frozen.relations, h, r))


def test_projected_tables_in_bf16_are_the_rounded_product_of_rounded_operands_and_follow_the_features():
    """Under bf16 a feature teacher's table ``X W / scale`` is one bf16 product (bf16 operands, float32 accumulation,
    bf16 result): within one bf16 step of the float64 product of the rounded operands, as ``bf16sim`` simulates it;
    float32 is unchanged. The bf16 copy of the fixed features is made once and made again when the buffer changes."""
    from dsom.models.representations import projected_table

    t, _ = _teachers(E=30, d=8)
    x, w = t.feature_matrix(0), t.projections[0]
    exact = (x.bfloat16().double() @ (w / t.scale).bfloat16().double()).detach()
    low = projected_table(x, w, t.scale, "bf16")
    sim = projected_table(x, w, t.scale, "bf16sim")
    assert low.dtype == torch.bfloat16 and sim.dtype == torch.float32
    step = exact.abs() * 2 ** -7 + 1e-12
    assert bool(((low.double() - exact).abs() <= step).all()) and bool(((sim.double() - exact).abs() <= step).all())
    assert not torch.equal(low.float(), (x @ (w / t.scale)).detach())  # really rounded
    torch.testing.assert_close(projected_table(x, w, t.scale, "fp32"), x @ (w / t.scale))
    tables = t.entity_table_list("bf16")
    assert tables[0] is t.structure and all(tb.dtype == torch.bfloat16 for tb in tables[1:])
    first = t._features_for(0, "bf16")
    assert t._features_for(0, "bf16") is first  # cached
    state = t.state_dict()
    state["features_0"] = state["features_0"] * 2
    t.load_state_dict(state)  # written in place
    again = t._features_for(0, "bf16")
    assert again is not first and torch.equal(again, (x * 1).bfloat16())  # x is the buffer, now doubled
    torch.testing.assert_close(again.float(), (first.float() * 2))
