"""Stage 2 scores a frozen teacher only on the rows that read it (issue 12): a query that weights a teacher 0 does not
have it scored unless a reward reads it. The scores of the rows that are computed equal the full product, the others
are exact zeros, and a step's losses and gradients equal those of scoring every teacher everywhere."""

from __future__ import annotations

import pytest
import torch

from dsom.config import Config, set_value
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


@pytest.mark.parametrize("batching", ["triples", "pairs"])
@pytest.mark.parametrize("selector,rewarded", [("single:text", "some"), ("rl", "some"), ("rl", "every"),
                                               ("avg", "some")])
def test_a_step_scores_only_the_teachers_its_queries_read_with_unchanged_losses_and_gradients(
        tmp_path, monkeypatch, batching, selector, rewarded):
    """The policy's state read from its sealed cache, a fixed teacher or all teachers: each scored row of the teachers'
    block is where a query weights that teacher non-zero, or a reward row (every teacher); the step's losses (CE, KD,
    RC) and every gradient equal those of the same step with every teacher scored everywhere."""
    from dsom.train.loop import PairIndex, group_pairs

    st = _trainer(tmp_path, **{"distill.selector": selector, "train.batching": batching})
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
        policy.cache.copy_(torch.randn(policy.cache.shape, generator=torch.Generator().manual_seed(4)))
        policy.cache_filled.fill_(True)
        assert policy.seal_cache()
        keys = PairIndex(st.train_queries).pair_of[:64] % n_pairs
        if pairs is not None:
            keys = keys.new_empty(len(pairs[0])).scatter_(0, pairs[2], keys)

    seen: dict[str, object] = {}
    original_logits = FrozenTeachers.logits
    original_select = type(model.selector).select

    def recording_logits(self, head, relation, precision, scale, queries, rows=None):
        seen["rows"] = rows
        return original_logits(self, head, relation, precision, scale, queries, None if seen.get("full") else rows)

    def recording_select(self, b):
        choice = original_select(self, b)
        seen["weights"] = choice.weights
        return choice

    monkeypatch.setattr(FrozenTeachers, "logits", recording_logits)
    monkeypatch.setattr(type(model.selector), "select", recording_select)
    out = {}
    for mode in ("rows", "full"):
        seen["full"] = mode == "full"
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
    if selector == "single:text":
        assert rows is not None and not bool(rows[[0, 2]].any())  # two of three teachers never scored
    if selector == "rl" and rewarded == "some":
        assert rows is not None and not bool(rows.all())  # the policy chose subsets: some products skipped
