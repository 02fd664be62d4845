import numpy as np
import torch

from dsom.data.csr import CSRIndex

from toy import random_graph


def _brute_sets(queries):
    sets = {}
    for e, r, a in queries:
        sets.setdefault((int(e), int(r)), set()).add(int(a))
    return sets


def test_mask_matches_brute_force_sets():
    ds = random_graph(num_entities=50, num_relations=3, num_triples=300)
    allq = np.concatenate([ds.queries(s) for s in ("train", "valid", "test")])
    sets = _brute_sets(allq)
    fi = ds.filter_index
    e = torch.tensor([k[0] for k in sets] + [0, 49])
    r = torch.tensor([k[1] for k in sets] + [5, 5])
    mask = fi.mask(e, r)
    for i in range(len(e)):
        expect = sets.get((int(e[i]), int(r[i])), set())
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expect
    np.testing.assert_array_equal(fi.counts(e, r).numpy(), [len(sets.get((int(a), int(b)), ())) for a, b in zip(e, r)])


def test_duplicates_collapse_and_answers_are_sorted():
    q = np.array([[1, 0, 5], [1, 0, 2], [1, 0, 5], [0, 1, 3]])
    idx = CSRIndex.from_queries(q, num_entities=6, num_relations=2)
    assert idx.nnz == 3
    assert idx.answers_of(1, 0).tolist() == [2, 5]
    assert idx.answers_of(0, 0).tolist() == []
    assert idx.lookup(torch.tensor([1, 0, 2]), torch.tensor([0, 1, 1])).tolist()[2] == -1


def test_chunk_mask_is_a_slice_of_the_full_mask():
    ds = random_graph(num_entities=40, num_relations=2, num_triples=200)
    e, r = torch.arange(40), torch.arange(40) % 4
    full = ds.filter_index.mask(e, r)
    torch.testing.assert_close(ds.filter_index.mask(e, r, 7, 23), full[:, 7:23])


def test_neighbour_index_uses_train_only_and_contains_the_target():
    ds = random_graph()
    ni = ds.neighbour_index
    q = ds.queries("train")
    m = ni.mask(torch.from_numpy(q[:, 0]), torch.from_numpy(q[:, 1]))
    assert m[torch.arange(len(q)), torch.from_numpy(q[:, 2])].all()
    train_keys = {(int(a), int(b), int(c)) for a, b, c in q}
    rows, cols = ni.pairs(torch.from_numpy(q[:, 0]), torch.from_numpy(q[:, 1]))
    for i, c in zip(rows.tolist(), cols.tolist()):
        assert (int(q[i, 0]), int(q[i, 1]), c) in train_keys


def test_padded_pairs_are_the_pairs_then_the_fill_without_a_host_read():
    ds = random_graph(num_entities=50, num_relations=3, num_triples=300)
    sets = _brute_sets(ds.queries("train"))
    nb = ds.neighbour_index
    g = torch.Generator().manual_seed(0)
    keys = list(sets)
    pick = torch.randint(len(keys), (40,), generator=g)
    e = torch.tensor([keys[i][0] for i in pick] + [49])  # (repeated queries, and one without answers)
    r = torch.tensor([keys[i][1] for i in pick] + [5])
    rows, cols = nb.pairs(e, r)
    total = len(rows)
    assert total == sum(len(sets.get((int(a), int(b)), ())) for a, b in zip(e, r))
    for extra in (0, 7):
        pr, pc = nb.padded_pairs(e, r, total + extra, fill=(3, torch.tensor(11)))
        assert pr.shape == pc.shape == (total + extra,)
        assert torch.equal(pr[:total], rows) and torch.equal(pc[:total], cols)
        assert (pr[total:] == 3).all() and (pc[total:] == 11).all()
    # fixed shapes and no data-dependent op: it runs on meta tensors (where nonzero, repeat_interleave, ... raise)
    meta = nb.to("meta")
    mr, mc = meta.padded_pairs(e.to("meta"), r.to("meta"), total + 7)
    assert mr.shape == mc.shape == (total + 7,) and mr.device.type == "meta"
