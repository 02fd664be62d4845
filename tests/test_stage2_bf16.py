"""Stage 2 under bf16 products (issue 12): the frozen teachers' logits stay bfloat16 (the product's own rounding),
the temperatures are folded into the queries, and every consumer upcasts inside its kernels. Checked against the
float32 computations on the same values."""

from __future__ import annotations

import pytest
import torch

from dsom.config import Config, set_value
from dsom.distill.actions import combine, subset_matrix
from dsom.distill.policy import Policy, policy_state
from dsom.models.products import bf16_round
from dsom.models.teachers import FrozenTeachers

from toy import clustered_graph


def _teachers(E=37, R2=6, d2=16, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FrozenTeachers(["structure", "text", "numeric"][:M], torch.randn(M, E, d2, generator=g),
                          torch.randn(M, R2, d2, generator=g))


def test_teacher_logits_fold_the_scale_into_the_queries_in_both_precisions():
    t = _teachers()
    h, r = torch.tensor([0, 5, 7, 36, 5]), torch.tensor([1, 0, 5, 2, 1])
    scale = torch.tensor([0.5, 1.7, 3.0])
    ref = t.score_all(h, r) * scale.view(-1, 1, 1)  # fp32 logits, then divided by the temperatures
    out = t.logits(h, r, "fp32", scale)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 37)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.logits(h, r, "fp32"), t.score_all(h, r))
    low = t.logits(h, r, "bf16", scale)
    assert low.dtype == torch.bfloat16
    # bf16 operands and result: within bf16 rounding of the fp32 logits (relative 2^-8 per operand and the result)
    torch.testing.assert_close(low.float(), ref, rtol=3e-2, atol=0.15 * float(ref.abs().mean()))
    assert not torch.equal(low.float(), ref)  # really rounded
    # and the same as the (unscaled) bf16 scorer used by evaluation, without the scale
    torch.testing.assert_close(t.logits(h, r, "bf16").float(), t.score_all(h, r, "bf16"), rtol=1e-2, atol=1e-2)
    assert policy_state(out).data_ptr() == out.data_ptr()  # the paper's policy state: a view in float32
    torch.testing.assert_close(policy_state(low), torch.cat(list(low), dim=1))


def test_compiled_teacher_queries_give_the_eager_logits():
    """The distiller's teacher queries through ``torch.compile`` (one pass over the gathered rows) give the logits of
    the eager queries: the same float32 queries (to rounding of the fused multiply-adds) and bf16 casts at most one
    bf16 step apart; with and without the temperature scale; ids repeated."""
    from dsom.models.teachers import teacher_queries
    from dsom.perf import MaybeCompiled

    t = _teachers()
    h, r = torch.tensor([0, 5, 7, 36, 5, 5]), torch.tensor([1, 0, 5, 2, 1, 1])
    compiled = MaybeCompiled(teacher_queries, True)
    for scale in (None, torch.tensor([0.5, 1.7, 3.0])):
        for dtype in (torch.float32, torch.bfloat16):
            eager = teacher_queries(t.tables, t.relations, h, r, scale, dtype)
            got = compiled(t.tables, t.relations, h, r, scale, dtype)
            assert got.dtype == dtype and got.shape == (3, 6, 16)
            if dtype == torch.float32:
                torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
            else:  # a float32 rounding difference may move a value across a bf16 rounding boundary
                assert float((got.float() - eager.float()).abs().max()) <= 2 ** -7 * float(eager.float().abs().max())
        want = t.score_all(h, r) * (1.0 if scale is None else scale.view(-1, 1, 1))
        torch.testing.assert_close(t.logits(h, r, "fp32", scale, compiled), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_the_weighted_sum_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g).to(dtype)
    w = torch.rand(6, 3, generator=g)
    out = combine(w, logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.einsum("bm,mbe->be", w, logits.float()))
    subsets = subset_matrix(3)
    torch.testing.assert_close(combine(subsets[torch.tensor([6, 0, 3, 2, 6, 5])], logits)[1], logits[0, 1].float())


def test_policy_runs_its_first_layer_as_a_bf16_product_on_a_bf16_state():
    g = torch.Generator().manual_seed(2)
    pol = Policy(40, 7, hidden=16, generator=g)
    state = torch.randn(9, 40, generator=g).to(torch.bfloat16)
    out = pol(state)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    grads = [p.grad.clone() for p in pol.parameters()]
    pol.zero_grad()
    # reference: the same bf16 values in float32 with bf16-rounded first-layer weights
    first, act, last = pol.net
    hidden = bf16_round(state.float() @ bf16_round(first.weight).T + bf16_round(first.bias))
    ref = last(act(hidden))
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    ref.square().sum().backward()
    for a, b in zip(grads, [p.grad for p in pol.parameters()]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    assert all(float(g_.abs().sum()) > 0 for g_ in grads)


def _student(tmp_path, state, selector="rl", temps=(0.7, 1.3, 2.0), compile_="off"):
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    cfg = Config()
    for k, v in {"model.rank": 8, "train.batch_size": 64, "train.precision": "fp32", "train.seed": 5,
                 "distill.selector": selector, "distill.policy_hidden": 8, "distill.policy_state": state,
                 "train.compile": compile_}.items():
        set_value(cfg, k, v)
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers(["structure", "text", "numeric"], torch.randn(3, ds.num_entities, 16, generator=g),
                            torch.randn(3, 2 * ds.num_relations, 16, generator=g))
    return StudentTrainer(ds, cfg, tmp_path, frozen, progress=False, temperatures=torch.tensor(temps))


@pytest.mark.parametrize("selector,state", [("rl", "summary"), ("rl", "logits"), ("avg", "summary"),
                                            ("best_strategy", "summary"), ("conf", "summary"), ("mulde", "summary")])
def test_bf16_teacher_logits_give_the_losses_of_their_float32_copy(tmp_path, monkeypatch, selector, state):
    """A stage-2 step on bf16 teacher logits equals the same step on those logits upcast to float32 first (the
    path before): losses and student gradients to float32 rounding; the paper's policy (its first layer then a
    bf16 product) to bf16 rounding."""
    st = _student(tmp_path, state, selector)
    d = st.model
    batch = st.train_queries[:50]
    nb = st._neighbour_mask(batch, batch)
    rows = torch.zeros(50, dtype=torch.bool)
    rows[::3] = True
    real = d.teachers.logits
    seen = []

    def run(upcast):
        def logits(*a, **k):
            out = real(*a, **k)
            seen.append(out.dtype)
            return out.float() if upcast else out
        monkeypatch.setattr(d.teachers, "logits", logits)
        d.zero_grad(set_to_none=True)
        losses, stats = d(batch, nb, precision="bf16", reward_rows=rows, generator=torch.Generator().manual_seed(3))
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}, stats)

    (l1, g1, s1), (l2, g2, s2) = run(False), run(True)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert set(l1) == set(l2) and "kd" in l1
    loose = state == "logits"  # the policy's first layer: a bf16 product against a float32 one
    for k in l1:
        if k == "rc" and loose:
            torch.testing.assert_close(l1[k], l2[k], rtol=5e-2, atol=5e-2)
        else:
            torch.testing.assert_close(l1[k], l2[k], rtol=1e-5, atol=1e-6)
    for k in g1:
        if k.startswith("selector.policy") and loose:  # bf16 rounding of the first layer's operands (a hidden
            # unit near 0 may switch its ReLU), as a whole: a wrong weight or state would be off by ~100%
            assert float((g1[k] - g2[k]).norm()) < 0.15 * float(g2[k].norm())
        else:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)
    if "actions" in s1 and not loose:
        assert torch.equal(s1["actions"], s2["actions"])


@pytest.mark.parametrize("selector,batching,compile_", [("rl", "triples", "off"), ("rl", "pairs", "off"),
                                                        ("mulde", "triples", "off"), ("none", "triples", "off"),
                                                        ("rl", "triples", "on")])
def test_bf16_student_scores_give_the_losses_of_their_float32_copy(tmp_path, monkeypatch, selector, batching,
                                                                   compile_):
    """Under bf16 the student's score block stays bfloat16 (``complex_scores``) and every consumer reads it as float32:
    the same losses and gradients as the float32 copy of that block (the path before) to float32 rounding."""
    from dsom.distill import distiller as distiller_mod

    st = _student(tmp_path, "summary", selector, compile_=compile_)
    d = st.model
    batch = st.train_queries[:50]
    pairs = None
    if batching == "pairs":
        uniq, of = torch.unique(batch[:, :2], dim=0, return_inverse=True)
        pairs = (uniq[:, 0], uniq[:, 1], of)
    nb = st._neighbour_mask(batch, batch, pairs=pairs)
    from dsom.models.fused import ComplExCE

    real = distiller_mod.complex_scores
    seen = []
    gathered = []
    inner = d._gathered_kd
    d._gathered_kd = lambda *a, **k: gathered.append(1) or inner(*a, **k)

    def run(upcast):
        def scores(*a, **k):
            out = real(*a, **k)
            seen.append(out.ce.dtype)
            return ComplExCE(out.ce.float(), out.head, out.relation, out.tail) if upcast else out
        monkeypatch.setattr(distiller_mod, "complex_scores", scores)
        d.zero_grad(set_to_none=True)
        losses, _ = d(batch, nb, precision="bf16", generator=torch.Generator().manual_seed(3), pairs=pairs)
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})

    (l1, g1), (l2, g2) = run(False), run(True)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert d._step_terms.enabled == (compile_ == "on")  # not silently eager
    assert set(l1) == set(l2) and "ce" in l1 and ("kd" in l1) == (selector != "none")
    for k in l1:
        torch.testing.assert_close(l1[k], l2[k], rtol=1e-5, atol=1e-6)
    assert "student.entity" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)
    if batching == "pairs":  # pairs whose queries drew different teacher subsets: KD on gathered rows
        assert gathered


def test_gathered_kd_on_a_bf16_block_sums_each_pairs_rows_in_float32():
    """``gathered_kd`` on a bfloat16 student block (the bf16 path) gives the float64 gradient of its float32 copy up to
    one bf16 rounding: a pair's repeated rows are summed before rounding, not each rounded and summed in bf16."""
    from dsom.config import DistillConfig
    from dsom.distill.distiller import gathered_kd
    from dsom.distill.losses import target_mask

    g = torch.Generator().manual_seed(0)
    P, E, M = 3, 40, 2
    student = (torch.randn(P, E, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    tea = (torch.randn(M, P, E, generator=g) * 3).to(torch.bfloat16)
    index = torch.tensor([0] * 8 + [1] * 8 + [2])
    weights = torch.rand(len(index), M, generator=g)
    nb = target_mask(torch.tensor([1, 2, 3]), E) | (torch.rand(P, E, generator=g) < 0.2)
    cfg = DistillConfig()
    gathered_kd(student, tea, index, weights, nb, cfg, "ndkd").sum().backward()
    ref = student.detach().double().requires_grad_(True)
    gathered_kd(ref, tea.double(), index, weights.double(), nb, cfg, "ndkd").sum().backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.double(), ref.grad.to(torch.bfloat16).double(), rtol=8e-3, atol=1e-6)
