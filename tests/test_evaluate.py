import numpy as np
import pytest
import torch

from dsom.evaluate import evaluate, rank_queries
from dsom.models.complex import ComplEx
from dsom.ranks import RankCounts, count_better, metrics_from_ranks

from toy import random_graph


class TableScorer:
    """Scores from a fixed (2R*E... ) lookup: scores[(entity, relation)] -> (E,) row."""

    def __init__(self, table: torch.Tensor, num_relations2: int) -> None:
        self.table = table  # (E * 2R, E)
        self.r2 = num_relations2

    def score_all(self, head, relation, precision="fp32", start=0, stop=None):
        rows = self.table[head * self.r2 + relation]
        return rows[:, start:stop]


def brute_force_ranks(scores_fn, ds, split):
    """Loop over queries: the textbook filtered rank, all three tie policies."""
    allq = np.concatenate([ds.queries(s) for s in ("train", "valid", "test")])
    known = {}
    for e, r, a in allq:
        known.setdefault((int(e), int(r)), set()).add(int(a))
    opt, pes = [], []
    for e, r, t in ds.queries(split):
        row = scores_fn(int(e), int(r))
        ts = row[t]
        greater = equal = 0
        for c in range(len(row)):
            if c == t or c in known[(int(e), int(r))]:
                continue
            if row[c] > ts:
                greater += 1
            elif row[c] == ts:
                equal += 1
        opt.append(1 + greater)
        pes.append(1 + greater + equal)
    return np.array(opt, float), np.array(pes, float)


def _table(ds, seed=0, levels=None):
    E, R2 = ds.num_entities, 2 * ds.num_relations
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(E * R2, E, generator=g)
    if levels:  # coarse scores produce many exact ties
        t = torch.round(t * levels) / levels
    return TableScorer(t, R2)


@pytest.mark.parametrize("levels", [None, 2])
def test_ranks_equal_brute_force_loop(levels):
    ds = random_graph(num_entities=40, num_relations=3, num_triples=300, seed=1)
    sc = _table(ds, levels=levels)
    opt, pes = brute_force_ranks(lambda e, r: sc.table[e * sc.r2 + r].numpy(), ds, "test")
    counts = rank_queries(sc, ds.queries("test"), ds.filter_index, batch_size=7)
    np.testing.assert_array_equal(counts.optimistic.numpy(), opt)
    np.testing.assert_array_equal(counts.pessimistic.numpy(), pes)
    np.testing.assert_allclose(counts.realistic.numpy(), (opt + pes) / 2)
    if levels:
        assert (pes > opt).any()  # the tie case is exercised


def test_entity_chunking_gives_identical_counts():
    ds = random_graph(num_entities=53, num_relations=2, num_triples=250, seed=2)
    sc = _table(ds, levels=3)
    q = ds.queries("test")
    full = rank_queries(sc, q, ds.filter_index, batch_size=16, memory_budget_mb=1024)
    tiny = rank_queries(sc, q, ds.filter_index, batch_size=16, memory_budget_mb=16 * 10 * 12 / 2**20)
    torch.testing.assert_close(full.greater, tiny.greater)
    torch.testing.assert_close(full.equal, tiny.equal)


def test_constant_scorer_gets_a_low_realistic_mrr():
    ds = random_graph(num_entities=200, num_relations=2, num_triples=600, seed=3)

    class Constant:
        def score_all(self, head, relation, precision="fp32", start=0, stop=None):
            stop = ds.num_entities if stop is None else stop
            return torch.zeros(len(head), stop - start)

    m = evaluate(Constant(), ds, "test")
    assert m["optimistic"]["mrr"] == 1.0
    assert m["realistic"]["mrr"] < 0.05
    assert m["pessimistic"]["mr"] > 150


def test_filtered_answers_never_change_a_rank():
    ds = random_graph(num_entities=40, num_relations=3, num_triples=300, seed=4)
    sc = _table(ds)
    q = ds.queries("test")
    base = rank_queries(sc, q, ds.filter_index)
    # Push every known answer (other than nothing else) to +inf / -inf: ranks must not move,
    # except that the target's own score is also a known answer, so restore it afterwards.
    boosted = sc.table.clone()
    allq = np.concatenate([ds.queries(s) for s in ("train", "valid", "test")])
    rows = torch.from_numpy(allq[:, 0] * sc.r2 + allq[:, 1])
    boosted[rows, torch.from_numpy(allq[:, 2])] = 1e9
    target_rows = torch.from_numpy(q[:, 0] * sc.r2 + q[:, 1])
    boosted[target_rows, torch.from_numpy(q[:, 2])] = sc.table[target_rows, torch.from_numpy(q[:, 2])]
    # a query whose target is also another query's target in the same row keeps its original value
    after = rank_queries(TableScorer(boosted, sc.r2), q, ds.filter_index)
    torch.testing.assert_close(base.greater, after.greater)
    torch.testing.assert_close(base.equal, after.equal)


def test_head_and_tail_directions_split_the_queries():
    ds = random_graph(seed=5)
    m = ComplEx(ds.num_entities, 2 * ds.num_relations, 8, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    out = evaluate(m, ds, "test")
    n = len(ds.test)
    assert out["queries"] == 2 * n
    both = out["realistic"]["mrr"]
    avg = (out["head"]["realistic"]["mrr"] + out["tail"]["realistic"]["mrr"]) / 2
    assert both == pytest.approx(avg)


def test_metrics_closed_form():
    m = metrics_from_ranks(torch.tensor([1.0, 2.0, 4.0, 20.0]))
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert m["mr"] == pytest.approx(6.75)
    assert m["hits@1"] == 0.25 and m["hits@3"] == 0.5 and m["hits@10"] == 0.75


def test_nan_scores_raise():
    with pytest.raises(FloatingPointError):
        count_better(torch.tensor([[0.0, float("nan")]]), torch.tensor([0.0]), torch.zeros(1, 2, dtype=torch.bool))


def test_rankcounts_policies():
    c = RankCounts(torch.tensor([0, 2]), torch.tensor([3, 0]))
    assert c.optimistic.tolist() == [1, 3]
    assert c.pessimistic.tolist() == [4, 3]
    assert c.realistic.tolist() == [2.5, 3]


class CountingScorer(TableScorer):
    """A TableScorer that also returns a second view (-scores) and records how many rows it scored."""

    def __init__(self, table, r2):
        super().__init__(table, r2)
        self.rows_scored = 0

    def score_all(self, head, relation, precision="fp32", start=0, stop=None):
        s = super().score_all(head, relation, precision, start, stop)
        self.rows_scored += len(head) * (s.shape[-1] / self.table.shape[1])
        return torch.stack([s, -s])


@pytest.mark.parametrize("budget_mb", [1024, 3 * 9 * 12 / 2**20])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_queries_sharing_a_pair_are_scored_once_and_ranked_like_a_loop(batch, budget_mb):
    # Train queries of a dense graph: many (entity, relation) pairs have several answers.
    ds = random_graph(num_entities=30, num_relations=2, num_triples=400, seed=5)
    table = torch.round(torch.randn(30 * 4, 30, generator=torch.Generator().manual_seed(1)) * 2) / 2
    q = ds.queries("train")
    pairs = len(np.unique(q[:, 0] * 4 + q[:, 1]))
    assert pairs < len(q) / 2  # the sharing case is exercised
    rng = np.random.default_rng(0)
    q = q[rng.permutation(len(q))]
    sc = CountingScorer(table, 4)
    counts = rank_queries(sc, q, ds.filter_index, batch_size=batch, memory_budget_mb=budget_mb)
    assert counts.greater.shape == (2, len(q))
    known: dict = {}
    for s in ("train", "valid", "test"):
        for e, r, a in ds.queries(s):
            known.setdefault((int(e), int(r)), set()).add(int(a))
    for view, sign in ((0, 1.0), (1, -1.0)):
        for i, (e, r, t) in enumerate(q):
            row = sign * table[e * 4 + r]
            keep = [c for c in range(30) if c != t and c not in known[(int(e), int(r))]]
            assert int(counts.greater[view, i]) == int((row[keep] > row[t]).sum())
            assert int(counts.equal[view, i]) == int((row[keep] == row[t]).sum())
    if budget_mb == 1024:
        assert sc.rows_scored == pairs  # each distinct pair once
