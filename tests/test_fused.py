"""dsom.models.fused: the one-node ComplEx 1-vs-all cross-entropy equals the plain autograd graph (gathers, complex
product, 1-vs-all product, cross-entropy, N3 on the gathered rows) in value and in every gradient, for one table
and for several (a free table plus a projected feature table, as in stage 1), with targets sharing query rows,
eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsom.models.complex import regularizer
from dsom.models.fused import EAGER, CETails, ComplExCE, complex_cross_entropy, fused_factors, fused_penalty
from dsom.models.interaction import complex_modulus, complex_query


def _plain(tables, relations, head, relation, target, rows, precision, reg):
    """Reference: float64 autograd, one model at a time, F.cross_entropy on the materialised score rows."""
    total = 0.0
    for k, table in enumerate(tables):
        q = complex_query(table[head], relations[k, relation])
        s = q @ table.T
        if precision == "bf16sim":  # bf16 operands, fp32 accumulation, bf16 result
            s = (q.float().bfloat16().double() @ table.float().bfloat16().double().T).float().bfloat16().double()
        ce = F.cross_entropy(s[rows], target, reduction="none")
        pen = sum((complex_modulus(x) ** 3).sum() for x in (table[head][rows], relations[k, relation][rows],
                                                             table[target]))
        total = total + ce.mean() + reg * pen / len(target)
    return total


def _setup(seed=0, E=40, R=5, d=6, P=9, T=17):
    g = torch.Generator().manual_seed(seed)
    free = (torch.randn(E, 2 * d, generator=g) * 0.7).requires_grad_()
    feats = torch.randn(E, 11, generator=g)
    proj = (torch.randn(11, 2 * d, generator=g) * 0.3).requires_grad_()
    relations = (torch.randn(2, 2 * R, 2 * d, generator=g) * 0.7).requires_grad_()
    head = torch.randint(0, E, (P,), generator=g)
    relation = torch.randint(0, 2 * R, (P,), generator=g)
    rows = torch.cat([torch.arange(P), torch.randint(0, P, (T - P,), generator=g)])  # every row used, some twice+
    target = torch.randint(0, E, (T,), generator=g)
    return free, feats, proj, relations, head, relation, rows, target


@pytest.mark.parametrize("chunk", [None, 7, 40])
@pytest.mark.parametrize("with_rows", [True, False])
def test_fused_matches_plain_graph_fp32(with_rows, chunk):
    """Loss and gradients (free table, projection, relations; CE and N3 on the returned rows) against a float64
    autograd graph; ``chunk=7``: the entity-chunked node (6 blocks of 7 and one of 5), 40 = E: one block."""
    free, feats, proj, relations, head, relation, rows, target = _setup()
    if not with_rows:
        head, relation, target = head[rows], relation[rows], target
        rows = torch.arange(len(target))
    reg = 0.05
    tables = [free, feats @ proj / 3.0]
    out = complex_cross_entropy(tables, relations, head, relation, target, None if not with_rows else rows, "fp32",
                                chunk=chunk)
    assert out.ce.shape == (2, len(target))
    loss = out.ce.mean(1).sum() + reg * sum((f ** 3).sum() for f in fused_factors(out, rows if with_rows else None)) \
        / len(target)
    got = torch.autograd.grad(loss, [free, proj, relations])

    leaves = [free.detach().double().requires_grad_(), proj.detach().double().requires_grad_(),
              relations.detach().double().requires_grad_()]
    ref = _plain([leaves[0], feats.double() @ leaves[1] / 3.0], leaves[2], head, relation, target, rows, "fp32", reg)
    want = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_fused_bf16sim_matches_bf16_numerics():
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=1)
    out = complex_cross_entropy([free], relations[:1], head, relation, target, rows, "bf16sim")
    ref = _plain([free.detach().double()], relations[:1].detach().double(), head, relation, target, rows, "bf16sim", 0.0)
    torch.testing.assert_close(out.ce[0].mean().double(), ref, rtol=1e-5, atol=1e-5)


def test_fused_bf16_gradient_close_to_fp32():
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=2)
    grads = {}
    for precision in ("fp32", "bf16"):
        out = complex_cross_entropy([free], relations[:1], head, relation, target, rows, precision)
        grads[precision] = torch.autograd.grad(out.ce.mean(), [free, relations])
    for a, b in zip(grads["bf16"], grads["fp32"]):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_frozen_table_gets_no_gradient_and_others_do():
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=3)
    frozen = free.detach()
    out = complex_cross_entropy([frozen, feats @ proj], relations, head, relation, target, rows, "fp32")
    g_proj, g_rel = torch.autograd.grad(out.ce.sum(), [proj, relations])
    assert g_proj.abs().sum() > 0 and g_rel.abs().sum() > 0


def test_compiled_tails_match_eager():
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=4, E=300)
    res = []
    for tails in (EAGER, CETails(True)):
        out = complex_cross_entropy([free], relations[:1], head, relation, target, rows, "fp32", tails)
        res.append((out.ce.detach(), *torch.autograd.grad(out.ce.mean(), [free, relations])))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mismatched_relation_tables_rejected():
    free, feats, proj, relations, head, relation, rows, target = _setup()
    with pytest.raises(ValueError, match="relation tables"):
        complex_cross_entropy([free], relations, head, relation, target, rows)


@pytest.mark.parametrize("kind", ["n3", "f2"])
@pytest.mark.parametrize("with_rows", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_penalty_matches_autograd_of_the_regularizer(kind, with_rows, compiled):
    """The closed-form penalty (a query row weighted by its number of targets) equals autograd through
    ``regularizer(kind, fused_factors(...))``, which gathers the rows once per target, in value and gradient."""
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=5)
    feats = feats.double()
    feats[head[0]] = 0.0  # a zero row: modulus at the floor, zero gradient (not NaN)
    leaves = [free.detach().double().requires_grad_(), proj.detach().double().requires_grad_(),
              relations.detach().double().requires_grad_()]
    if not with_rows:
        head, relation, target, rows = head[rows], relation[rows], target, None
    results = []
    for fused in (True, False):
        tables = [leaves[0], feats @ leaves[1] / 3.0]  # the rows the CE node returns, here in float64
        out = ComplExCE(torch.zeros(0), torch.stack([t[head] for t in tables]), leaves[2][:, relation],
                        torch.stack([t[target] for t in tables]))
        if fused:
            pen = fused_penalty(out, rows, kind, 0.05, 7, CETails(compiled))
        else:
            pen = regularizer(kind, fused_factors(out, rows), 0.05, batch=7)
        results.append((pen.detach(), *torch.autograd.grad(pen, leaves)))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert results[0][2].abs().sum() > 0  # the projection gets a penalty gradient


def test_fused_penalty_off_and_unknown():
    free, feats, proj, relations, head, relation, rows, target = _setup()
    out = complex_cross_entropy([free], relations[:1], head, relation, target, rows, "fp32")
    assert fused_penalty(out, rows, "none", 0.1, 5) is None
    assert fused_penalty(out, rows, "n3", 0.0, 5) is None
    with pytest.raises(ValueError, match="unknown regularizer"):
        fused_penalty(out, rows, "l1", 0.1, 5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_transposed_score_layout_equals_the_row_layout(precision, compiled):
    """Scores built as ``(E, P) = T @ q^T`` (the bf16 default) give the loss and every gradient of the ``(P, E)``
    layout: to fp32 rounding in fp32, within bf16 rounding of the products in bf16."""
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=6, E=300)
    res = []
    for transposed in (False, True):
        out = complex_cross_entropy([free, feats @ proj / 3.0], relations, head, relation, target, rows, precision,
                                    CETails(compiled), transposed=transposed)
        loss = out.ce.mean(1).sum() + 0.05 * sum((f ** 3).sum() for f in fused_factors(out, rows)) / len(target)
        res.append((out.ce.detach(), *torch.autograd.grad(loss, [free, proj, relations])))
    tol = {"fp32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=2e-2, atol=2e-3)}[precision]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **tol)
    assert res[1][1].abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16sim", "bf16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_complex_scores_equal_gathered_rows_and_product_scores(precision, compiled):
    """``complex_scores`` (stage 2's student: scores and rows as one node, the rows' gradients added into the
    product's dense table gradient) equals the autograd graph it replaces: ``index_select`` of the rows, the complex
    product, ``product_scores``; values and the gradients of the table and the relations, with a loss on the scores
    and an N3 penalty on the returned rows, repeated heads and targets. (Both read the queries from the same, eager or
    compiled, ``CETails.query``: a compiled complex product may round differently, and bf16 rounds that again.)"""
    from dsom.models.fused import complex_scores
    from dsom.models.products import product_scores

    g = torch.Generator().manual_seed(4)
    E, R2, D, P = 40, 10, 12, 15
    table = (torch.randn(E, D, generator=g) * 0.7).requires_grad_()
    relations = (torch.randn(R2, D, generator=g) * 0.7).requires_grad_()
    head = torch.cat([torch.randint(0, E, (P - 3,), generator=g), torch.tensor([3, 3, 3])])
    relation = torch.randint(0, R2, (P,), generator=g)
    target = torch.cat([head[:4], torch.randint(0, E, (P - 4,), generator=g)])  # some rows are heads and targets
    w = torch.randn(P, E, generator=g)

    def loss(scores, h, r, t):
        pen = sum((complex_modulus(x) ** 3).sum() for x in (h, r, t))
        return (scores.float() * w).sum() + 0.3 * pen

    tails = CETails(compile=True) if compiled else EAGER
    out = complex_scores(table, relations, head, relation, target, precision, tails)
    got = loss(out.ce, out.head[0], out.relation[0], out.tail[0])
    gt, gr = torch.autograd.grad(got, (table, relations))
    assert out.ce.shape == (P, E) and out.ce.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)

    h, r, t = table.index_select(0, head), relations.index_select(0, relation), table.index_select(0, target)
    ref_scores = product_scores(tails.query(h[None], r[None], precision)[0], table, precision)  # (rounds bf16sim)
    ref = loss(ref_scores, h, r, t)
    rt, rr = torch.autograd.grad(ref, (table, relations))
    torch.testing.assert_close(out.ce, ref_scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # bf16: the backward products' bf16 results are the same; the float32 additions differ in order
    tol = dict(rtol=1e-5, atol=1e-5) if precision != "bf16" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gt, rt, **tol)
    torch.testing.assert_close(gr, rr, **tol)
    assert float(gt[head].abs().sum()) > 0 and float(gt[3].abs().sum()) > 0


@pytest.mark.parametrize("transposed", [True, False])
def test_a_bf16_table_gets_the_float32_tables_gradient_rounded_once(transposed):
    """Stage 1 under bf16 projects the features in bf16, so a feature teacher's table reaches the node as bfloat16. Its
    gradient is the bf16 product block with the rows' gradients (query heads, N3 on heads and targets; repeated ids)
    added in float32 and rounded once: the gradient the same node gives the float32 copy of that table, cast to bf16
    (to one bf16 step where the float32 additions' order differs); the loss and the other table's gradient equal."""
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=3)
    low = (feats @ proj).detach().to(torch.bfloat16).requires_grad_()
    high = low.detach().float().requires_grad_()
    out = {}
    for name, table in (("bf16", low), ("fp32", high)):
        res = complex_cross_entropy([free, table], relations, head, relation, target, rows, "bf16",
                                    transposed=transposed)
        loss = res.ce.mean() + fused_penalty(res, rows, "n3", 0.05, len(target))
        out[name] = (loss.detach(), *torch.autograd.grad(loss, (free, table, relations)))
    (l1, f1, t1, r1), (l2, f2, t2, r2) = out["bf16"], out["fp32"]
    assert t1.dtype == torch.bfloat16 and t2.dtype == torch.float32
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)
    want = t2.to(torch.bfloat16).float()
    step = want.abs() * 2 ** -7 + 1e-30  # one bf16 step (8 significant bits) at each value
    assert bool(((t1.float() - want).abs() <= step).all())
    assert int((t1.float() != want).sum()) <= max(1, int(0.02 * want.numel()))  # almost every value identical


@pytest.mark.parametrize("E", [50, 128, 300])  # one block pass (E < 2 blocks), whole blocks, blocks + a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_column_logsumexp_in_row_blocks_equals_float64_logsumexp(E, dtype, compiled):
    """``CETails.lse_t`` (blocks of rows, combined) is ``logsumexp`` over dim 0 of the ``(E, P)`` scores, with columns
    whose maximum sits in the remainder rows, columns spread far beyond the exponent floor, and a constant column."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(E, 7, generator=g) * 4
    s[-1, 0] = 30.0  # maximum in the last row (the remainder when E is not a whole number of blocks)
    s[:, 1] = torch.linspace(-300, 90, E)  # most of the column more than 64 below its maximum
    s[:, 2] = -5.0
    s = s.to(dtype)
    got = CETails(compiled).lse_t(s)
    ref = torch.logsumexp(s.double(), 0)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("P", [1, 8, 9, 15, 16])
def test_padded_queries_are_the_transposed_queries_then_zero_columns(P):
    """The training step's ``(2d, W)`` operand: W the next multiple of 8, the queries transposed, zeros after; its
    scores are the row layout's, transposed, and 0 in the padded columns."""
    from dsom.models.products import COLUMN_PAD, padded_queries_t

    g = torch.Generator().manual_seed(P)
    q, table = torch.randn(P, 6, generator=g), torch.randn(11, 6, generator=g)
    q_t = padded_queries_t(q)
    assert q_t.shape == (6, -(-P // COLUMN_PAD) * COLUMN_PAD) and q_t.shape[1] % 8 == 0 and q_t.is_contiguous()
    assert torch.equal(q_t[:, :P], q.T) and not q_t[:, P:].any()
    s = table @ q_t
    torch.testing.assert_close(s[:, :P], (q @ table.T).T)
    assert not s[:, P:].any()


@pytest.mark.parametrize("precision", ["fp32", "bf16sim", "bf16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_node_equals_the_unchunked_one(precision, compiled):
    """The entity-chunked node gives the unchunked node's loss and gradients (within the products' rounding), with
    pair rows and the N3 penalty on its returned rows."""
    free, feats, proj, relations, head, relation, rows, target = _setup(seed=4, E=300)
    res = []
    for chunk in (None, 64):
        out = complex_cross_entropy([free, feats @ proj / 3.0], relations, head, relation, target, rows, precision,
                                    CETails(compiled), chunk=chunk)
        loss = out.ce.mean(1).sum() + 0.05 * sum((f ** 3).sum() for f in fused_factors(out, rows)) / len(target)
        res.append((out.ce.detach(), *torch.autograd.grad(loss, [free, proj, relations])))
    # bf16 numerics: the two nodes round different intermediates (the chunked one also each probability block)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **tol)
    assert res[1][1].abs().sum() > 0
