"""Stage 2 scores a frozen teacher only on the rows that read it (issue 12): a query that weights a teacher 0 does not
have it scored unless a reward reads it. The scores of the rows that are computed equal the full product, the others
are exact zeros, and a step's losses and gradients equal those of scoring every teacher everywhere."""

from __future__ import annotations

import pytest
import torch

from dsom.config import Config, set_value
from dsom.models import products
from dsom.models.products import masked_rows, stacked_scores
from dsom.models.teachers import FrozenTeachers

from toy import clustered_graph


def _rows(M: int, B: int, seed: int) -> torch.Tensor:
    rows = torch.rand(M, B, generator=torch.Generator().manual_seed(seed)) < 0.5
    rows[0] = True  # one teacher on every row (the in-place path)
    rows[-1] = False  # one on none (zeros only)
    return rows


@pytest.mark.parametrize("B", [80, 10])  # column blocks (B >= 64) and the plain product
@pytest.mark.parametrize("precision", ["fp32", "bf16sim"])
def test_masked_stacked_scores_are_the_product_on_their_rows_and_zero_elsewhere(B, precision, monkeypatch):
    import dsom.models.products as products

    monkeypatch.setattr(products, "COLUMN_BLOCK_BYTES", 4 * B * 256)  # several column blocks of 256 table rows
    g = torch.Generator().manual_seed(0)
    M, N, D = 4, 700, 12
    q, t = torch.randn(M, B, D, generator=g), torch.randn(M, N, D, generator=g)
    rows = _rows(M, B, 1)
    rows[1, :3] = True
    full = stacked_scores(q, t, precision)
    got = stacked_scores(q, t, precision, rows)
    assert got.shape == (M, B, N) and got.dtype == torch.float32
    ref = torch.einsum("mbd,mnd->mbn", q.double(), t.double())
    tol = 1e-4 if precision == "fp32" else 0.1  # bf16 operands
    for m in range(M):
        on = rows[m]
        torch.testing.assert_close(got[m, on].double(), ref[m, on], rtol=1e-3, atol=tol)
        torch.testing.assert_close(got[m, on], full[m, on], rtol=1e-5, atol=1e-5)
        assert bool((got[m, ~on] == 0).all())


def test_masked_rows_writes_only_through_the_given_view():
    out = torch.full((5, 3, 4), 7.0)
    rows = torch.tensor([True, False, True, False, False])
    masked_rows(out[:, 1], rows, lambda idx: idx.float().unsqueeze(1).expand(-1, 4) + 1)
    expected = torch.full((5, 3, 4), 7.0)
    expected[:, 1] = 0.0
    expected[0, 1], expected[2, 1] = 1.0, 3.0
    assert torch.equal(out, expected)


def test_masked_scores_refuse_autograd():
    q = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no autograd"):
        stacked_scores(q, torch.randn(2, 5, 4), "fp32", torch.tensor([[True, False, True], [True, True, True]]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_frozen_teacher_logits_on_rows(precision):
    g = torch.Generator().manual_seed(2)
    frozen = FrozenTeachers(["structure", "text", "image"], torch.randn(3, 90, 16, generator=g),
                            torch.randn(3, 10, 16, generator=g))
    head, rel = torch.randint(0, 90, (70,), generator=g), torch.randint(0, 10, (70,), generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0])
    rows = _rows(3, 70, 3)
    full = frozen.logits(head, rel, precision, scale)
    got = frozen.logits(head, rel, precision, scale, rows=rows)
    assert got.dtype == full.dtype and got.shape == full.shape
    tol = 1e-5 if precision == "fp32" else 2e-2
    for m in range(3):
        torch.testing.assert_close(got[m, rows[m]].float(), full[m, rows[m]].float(), rtol=tol, atol=tol)
        assert bool((got[m, ~rows[m]] == 0).all())


def test_row_blocks_hold_each_models_rows_and_give_them_back_with_zeros_elsewhere():
    g = torch.Generator().manual_seed(6)
    M, B, N = 3, 9, 5
    full = torch.randn(M, B, N, generator=g)
    rows = _rows(M, B, 7)  # one model on every row, one on none
    asked = {}

    def score(m, idx):
        asked[m] = idx.tolist()
        return full[m, idx]

    rb = products.RowBlocks.score(rows, score)
    for m in range(M):
        assert asked[m] == rows[m].nonzero().squeeze(1).tolist() and rb.blocks[m].shape == (int(rows[m].sum()), N)
        assert torch.equal(rb.pos[m] >= 0, rows[m])
    dense = rb.rows()
    assert torch.equal(dense, torch.where(rows.unsqueeze(-1), full, torch.zeros(())))
    idx = torch.tensor([4, 0, 4])
    assert torch.equal(rb.rows(idx), dense[:, idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_step_terms_compiled_equal_the_stacked_block_terms(dtype):
    """The compiled terms reading each teacher's own rows in place give the losses and the student gradient of the
    eager terms on the ``(M, B, E)`` block with zeros where a teacher's weight is 0."""
    from dsom.distill.distiller import row_step_terms, step_terms
    from dsom.perf import MaybeCompiled

    cfg = Config().distill
    g = torch.Generator().manual_seed(8)
    M, B, E = 3, 10, 37
    w = torch.rand(B, M, generator=g) * (torch.rand(B, M, generator=g) < 0.6)
    w[:, 0] += 0.1  # every row weights some teacher
    full = (torch.randn(M, B, E, generator=g) * 3).to(dtype)
    rows = w.T != 0
    rows[1, 2] = True  # a row scored for a teacher it weights 0 (a reward row)
    rb = products.RowBlocks.score(rows, lambda m, idx: full[m, idx])
    target = torch.randint(0, E, (B,), generator=g)
    nb = torch.rand(B, E, generator=g) < 0.2
    nb[torch.arange(B), target] = True
    out = {}
    for name in ("stacked", "rows"):
        student = (torch.randn(B, E, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_()
        if name == "stacked":
            terms = step_terms(student, rb.rows(), w, target, nb, cfg, True, None, "ndkd")
        else:
            terms = MaybeCompiled(row_step_terms, True)(student, rb.blocks, rb.pos, w, target, nb, cfg, "ndkd")
        (terms["ce"].sum() + terms["kd"].pow(2).sum()).backward()
        out[name] = (terms["ce"].detach(), terms["kd"].detach(), student.grad)
    for a, b in zip(out["rows"], out["stacked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(out["rows"][1].abs().sum()) > 0


def _trainer(tmp_path, **kw):
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers(["structure", "text", "image"], torch.randn(3, ds.num_entities, 16, generator=g),
                            torch.randn(3, 2 * ds.num_relations, 16, generator=g))
    cfg = Config()
    base = {"model.rank": 8, "train.epochs": 2, "train.batch_size": 64, "train.precision": "fp32", "train.seed": 5,
            "model.init_scale": 0.3, "distill.policy_hidden": 8}
    base.update(kw)
    for k, v in base.items():
        set_value(cfg, k, v)
    return StudentTrainer(ds, cfg, tmp_path, frozen, progress=False)


@pytest.mark.parametrize("blocks", [True, False], ids=["row-blocks", "stacked"])
@pytest.mark.parametrize("batching", ["triples", "pairs"])
@pytest.mark.parametrize("selector,rewarded", [("single:text", "some"), ("rl", "some"), ("rl", "every"),
                                               ("avg", "some")])
def test_a_step_scores_only_the_teachers_its_queries_read_with_unchanged_losses_and_gradients(
        tmp_path, monkeypatch, batching, selector, rewarded, blocks):
    """The policy's state read from its sealed cache, a fixed teacher or all teachers: each teacher is scored only
    where a query weights it non-zero, or on a reward row (every teacher); the step's losses (CE, KD, RC) and every
    gradient equal those of the same step with every teacher scored everywhere into the ``(M, B, E)`` block. Per-query
    batches keep each teacher's rows as its own block, read in place by the loss (``teacher_row_blocks``), or write
    them into the stacked block."""
    from dsom.data.pairs import PairIndex, group_pairs

    st = _trainer(tmp_path, **{"distill.selector": selector, "distill.batching": batching})
    model = st.model
    batch = st.train_queries[:64]
    B = len(batch)
    pairs = group_pairs(batch) if batching == "pairs" else None
    nb = st._neighbour_mask(batch, batch, pairs=pairs)
    reward_rows = None if rewarded == "every" else torch.arange(B) % 5 == 0
    keys = None
    if model.policy is not None:  # a sealed summary cache: the policy chooses without the teachers' logits
        policy = model.policy
        n_pairs = len(PairIndex(st.train_queries).counts)
        policy.cache.values.copy_(torch.randn(policy.cache.shape, generator=torch.Generator().manual_seed(4)))
        policy.cache.filled.fill_(True)
        assert policy.cache.seal()
        keys = PairIndex(st.train_queries).pair_of[:64] % n_pairs
        if pairs is not None:
            keys = keys.new_empty(len(pairs[0])).scatter_(0, pairs[2], keys)

    seen: dict[str, object] = {}
    original_logits = FrozenTeachers.logits
    original_select = type(model.selector).select

    original_row_logits = FrozenTeachers.row_logits

    def recording_logits(self, head, relation, precision, scale, queries, rows=None):
        seen["rows"] = rows
        return original_logits(self, head, relation, precision, scale, queries, None if seen.get("full") else rows)

    def recording_row_logits(self, head, relation, rows, *args):
        seen["rows"], seen["row_blocks"] = rows, True
        return original_row_logits(self, head, relation, rows, *args)

    def recording_select(self, b):
        choice = original_select(self, b)
        seen["weights"] = choice.weights
        return choice

    monkeypatch.setattr(FrozenTeachers, "logits", recording_logits)
    monkeypatch.setattr(type(model.selector), "select", recording_select)
    monkeypatch.setattr(FrozenTeachers, "row_logits", recording_row_logits)
    out = {}
    for mode in ("full", "rows"):
        seen["full"] = mode == "full"
        model.teacher_row_blocks = blocks and mode == "rows"
        seen.pop("row_blocks", None)
        model.zero_grad(set_to_none=True)
        losses, _ = model(batch, nb, precision="fp32", generator=torch.Generator().manual_seed(3),
                          reward_rows=reward_rows, pairs=pairs, pair_keys=keys)
        sum(losses.values()).backward()
        out[mode] = ({k: v.detach() for k, v in losses.items()}, seen["rows"], seen["weights"].clone(),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l1, rows, w1, g1), (l2, _, w2, g2) = out["rows"], out["full"]
    assert torch.equal(w1, w2)  # the same draws
    assert set(l1) == set(l2) and "kd" in l1 and ("rc" in l1) == (selector == "rl")
    for k in l1:
        torch.testing.assert_close(l1[k], l2[k], rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g2) and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)
    # which rows were scored: chosen teachers, plus every teacher on the reward rows
    expected = w1.T != 0
    if selector == "rl":
        expected = expected | (torch.ones(B, dtype=torch.bool) if reward_rows is None else reward_rows)
    if pairs is not None:
        expected = torch.zeros(3, len(pairs[0])).index_add_(1, pairs[2], expected.float()) > 0
    if rows is None:
        assert bool(expected.all())
    else:
        assert torch.equal(rows, expected)
    # per-query batches, some rows skipped: one block per teacher, no (M, B, E) block
    assert seen.get("row_blocks", False) == (blocks and pairs is None and not bool(expected.all()))
    if selector == "single:text":
        assert rows is not None and not bool(rows[[0, 2]].any())  # two of three teachers never scored
    if selector == "rl" and rewarded == "some":
        assert rows is not None and not bool(rows.all())  # the policy chose subsets: some products skipped
