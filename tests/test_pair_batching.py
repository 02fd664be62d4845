"""train.batching=pairs (issue 12, item 1): each (entity, relation) pair of a batch is scored once and its row is
shared by all its targets; the loss and its gradient equal per-triple batching on the same triples, and both equal
an independent brute-force computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dsom.config import Config
from dsom.data.pairs import PairIndex, group_pairs
from dsom.evaluate import evaluate
from dsom.train.loop import ComplExTrainer
from dsom.train.teachers import TeacherTrainer

from toy import clustered_graph, config

_BASE = {"model.rank": 8, "train.epochs": 4, "train.batch_size": 64, "train.valid_every": 2,
         "train.precision": "fp32", "train.seed": 5, "model.init_scale": 0.3}


def _cfg(**kw):
    return config(_BASE, **kw)


def _pair_heavy_batch(ds, n=60):
    """Training queries of a few pairs with several tails each, shuffled so the pairs are not contiguous."""
    q = torch.from_numpy(ds.queries("train"))
    idx = PairIndex(q)
    big = torch.nonzero(idx.counts >= 2).squeeze(1)[:12]
    rows = torch.nonzero(torch.isin(idx.pair_of, big)).squeeze(1)
    rows = torch.cat([rows, torch.arange(7)])[:n]  # plus a few other queries
    return q[rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]]


def _brute_complex(entity, relation, batch, reg):
    """Mean over triples of [logsumexp_e <q, e> - <q, t>] + N3 on (|h|, |r|, |t|), in float64, triple by triple."""
    d = entity.shape[1] // 2
    total = 0.0
    pen = 0.0
    for h, r, t in batch.tolist():
        a, b = entity[h, :d], entity[h, d:]
        c, g = relation[r, :d], relation[r, d:]
        q = torch.cat([a * c - b * g, a * g + b * c])
        scores = entity @ q
        total = total + torch.logsumexp(scores, 0) - scores[t]
        for row in (entity[h], relation[r], entity[t]):
            pen = pen + ((row[:d] ** 2 + row[d:] ** 2).sqrt() ** 3).sum()
    return total / len(batch) + reg * pen / len(batch)


def _grads(tr, batch):
    tr.model.zero_grad(set_to_none=True)
    loss = tr.loss(batch).total
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_mb", [0.0, 1e-3])  # whole (P, E) block, and entity chunks of the chunked CE
def test_complex_pairs_equal_triples_and_brute_force_in_loss_and_gradient(tmp_path, block_mb):
    ds = clustered_graph(num_entities=60)
    batch = _pair_heavy_batch(ds)
    assert len(group_pairs(batch)[0]) < len(batch) - 10  # the batch really shares rows
    out = {}
    for mode in ("triples", "pairs"):
        tr = ComplExTrainer(ds, _cfg(**{"train.batching": mode, "train.block_mb": block_mb}), tmp_path / mode,
                            progress=False)
        out[mode] = _grads(tr, batch)
    (l3, g3), (lp, gp) = out["triples"], out["pairs"]
    torch.testing.assert_close(lp, l3, rtol=1e-6, atol=1e-6)
    assert g3.keys() == gp.keys() == {"entity", "relation"}
    for k in g3:
        torch.testing.assert_close(gp[k], g3[k], rtol=1e-5, atol=1e-7)
    ent = tr.model.entity.detach().double().requires_grad_()
    rel = tr.model.relation.detach().double().requires_grad_()
    ref = _brute_complex(ent, rel, batch, tr.cfg.train.reg)
    ref.backward()
    torch.testing.assert_close(lp.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp["entity"].double(), ent.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gp["relation"].double(), rel.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("block_mb", [0.0, 1e-3])
def test_teachers_pairs_equal_triples_in_loss_and_gradient(tmp_path, block_mb):
    from dsom.data.modality import ModalityTable

    ds = clustered_graph(num_entities=60)
    rng = np.random.default_rng(0)
    feats = {"text": ModalityTable("text", rng.standard_normal((ds.num_entities, 5)).astype(np.float32),
                                   np.ones(ds.num_entities, bool))}
    batch = _pair_heavy_batch(ds)
    out = {}
    for mode in ("triples", "pairs"):
        cfg = _cfg(**{"train.batching": mode, "train.block_mb": block_mb, "modalities": ["structure", "text"]})
        out[mode] = _grads(TeacherTrainer(ds, cfg, tmp_path / mode, feats, progress=False), batch)
    (l3, g3), (lp, gp) = out["triples"], out["pairs"]
    torch.testing.assert_close(lp, l3, rtol=1e-6, atol=1e-6)
    assert g3.keys() == gp.keys() and len(g3) == 3
    for k in g3:
        torch.testing.assert_close(gp[k], g3[k], rtol=1e-5, atol=1e-7)


def _reference_cuts(sizes: list[int], batch_size: int) -> list[int]:
    """Batch offsets by a plain loop over the shuffled pairs' query counts: a batch closes at the first pair end at or
    past the next multiple of batch_size not yet passed."""
    offsets, total, mark = [0], 0, batch_size
    for c in sizes:
        total += c
        if total >= mark:
            offsets.append(total)
            while mark <= total:
                mark += batch_size
    if offsets[-1] != total:
        offsets.append(total)
    return offsets


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_pair_index_names_each_pair_and_blocks_hold_exactly_their_pairs_queries(size):
    """Against a plain dictionary of the queries' (entity, relation): the pairs in sorted order, each query's pair, the
    counts; ``blocks`` covers the pairs once, each block with exactly its pairs' queries, pair by pair in query order."""
    q = torch.from_numpy(clustered_graph(num_entities=50).queries("train"))
    q = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(1))]
    idx = PairIndex(q)
    keys = sorted({(h, r) for h, r, _ in q.tolist()})
    assert list(zip(idx.entities.tolist(), idx.relations.tolist(), strict=True)) == keys
    number = {k: i for i, k in enumerate(keys)}
    assert idx.pair_of.tolist() == [number[(h, r)] for h, r, _ in q.tolist()]
    assert idx.counts.tolist() == [sum(1 for h, r, _ in q.tolist() if (h, r) == k) for k in keys]
    seen, p_next = [], 0
    for p0, p1, sel in idx.blocks(size):
        assert p0 == p_next and p1 - p0 == min(size, idx.num_pairs - p0)
        p_next = p1
        expect = [i for p in range(p0, p1) for i, (h, r, _) in enumerate(q.tolist()) if (h, r) == keys[p]]
        assert sel.tolist() == expect
        seen += expect
    assert p_next == idx.num_pairs and sorted(seen) == list(range(len(q)))


@pytest.mark.parametrize("bs", [1, 7, 50, 10_000])
def test_pair_epochs_cover_every_query_once_keep_pairs_whole_and_depend_on_seed_and_epoch(bs):
    ds = clustered_graph(num_entities=90)
    q = torch.from_numpy(ds.queries("train"))
    idx = PairIndex(q)
    assert idx.counts.max() > 1  # some pairs have several queries
    order, offsets = idx.epoch_batches(3, 1, bs)
    assert sorted(order.tolist()) == list(range(len(q)))
    sizes = np.diff(offsets)
    assert offsets[0] == 0 and offsets[-1] == len(q) and (sizes > 0).all()
    pair_batch = {}
    for b in range(len(sizes)):
        for p in idx.pair_of[order[offsets[b]:offsets[b + 1]]].tolist():
            assert pair_batch.setdefault(p, b) == b  # a pair never spans two batches
    # the batches hold about batch_size queries each: cut at the first pair end at or past each multiple
    shuffled = idx.pair_of[order]
    pair_sizes = [len(g) for g in torch.split(shuffled, torch.unique_consecutive(shuffled, return_counts=True)[1].tolist())]
    assert offsets == _reference_cuts(pair_sizes, bs)
    assert len(sizes) <= -(-len(q) // bs)
    if bs == 1:
        assert len(sizes) == idx.num_pairs  # one pair per batch
    if bs == 10_000:
        assert offsets == [0, len(q)]
    within = order[idx.pair_of[order] == idx.pair_of[order[0]]]
    assert torch.equal(within, within.sort().values)  # a pair's queries keep their order
    again, off2 = idx.epoch_batches(3, 1, bs)
    assert torch.equal(again, order) and off2 == offsets
    assert not torch.equal(idx.epoch_batches(3, 2, bs)[0], order)
    assert not torch.equal(idx.epoch_batches(4, 1, bs)[0], order)


def test_pair_batches_hold_about_as_many_queries_as_triple_batches():
    """Where no pair is larger than a batch, batch b ends within one pair past b x batch_size queries, and an epoch has
    the triples' number of steps (one fewer where the last pair crosses the last multiple)."""
    q = torch.from_numpy(clustered_graph(num_entities=400).queries("train"))
    idx = PairIndex(q)
    bs = 64
    _, offsets = idx.epoch_batches(1, 1, bs)
    big = int(idx.counts.max())
    assert 1 < big <= bs
    for b, end in enumerate(offsets[1:-1], start=1):
        assert b * bs <= end < b * bs + big  # boundaries do not drift
    assert len(offsets) - 1 in (-(-len(q) // bs) - 1, -(-len(q) // bs))


def _reference_pieces(pair_of: list[int], k: int) -> list[tuple[int, int]]:
    """(pair, piece within the pair) of each query by a plain loop: a pair's queries, in order, fill pieces of k."""
    seen: dict[int, int] = {}
    out = []
    for p in pair_of:
        out.append((p, seen.get(p, 0) // k))
        seen[p] = seen.get(p, 0) + 1
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pair_pieces_cut_heavy_pairs_and_keep_light_ones_whole(k):
    """train.pair_max_queries: pieces of at most k queries; batches then hold pieces, not necessarily whole pairs."""
    q = torch.from_numpy(clustered_graph(num_entities=90).queries("train"))
    idx = PairIndex(q)
    assert idx.counts.max() > 5
    piece_of, counts = idx.pieces(k)
    ref = _reference_pieces(idx.pair_of.tolist(), k)
    labels = [ref[int((piece_of == j).nonzero()[0, 0])] for j in range(len(counts))]
    assert labels == sorted(set(ref))  # the loop's partition, one piece per label, numbered pair by pair
    for j in range(len(counts)):
        members = (piece_of == j).nonzero().flatten().tolist()
        assert len({ref[i] for i in members}) == 1 and len(members) == counts[j] <= k
    assert int(counts.sum()) == len(q) and len(counts) == int(((idx.counts + k - 1) // k).sum())
    order, offsets = idx.epoch_batches(3, 1, 50, k)
    assert sorted(order.tolist()) == list(range(len(q)))
    batch_of = torch.empty(len(q), dtype=torch.int64)
    for b in range(len(offsets) - 1):
        batch_of[order[offsets[b]:offsets[b + 1]]] = b
    for j in range(len(counts)):
        assert len(set(batch_of[piece_of == j].tolist())) == 1  # a piece never spans two batches
    big = int(idx.counts.argmax())
    assert len(set(batch_of[idx.pair_of == big].tolist())) > 1  # the heaviest pair is spread over batches
    # a cut that no pair exceeds is no cut: the same epochs as whole pairs
    whole = idx.epoch_batches(3, 1, 50)
    same = idx.epoch_batches(3, 1, 50, int(idx.counts.max()))
    assert torch.equal(whole[0], same[0]) and whole[1] == same[1]


def test_trainers_cut_pairs_by_train_pair_max_queries(tmp_path):
    ds = clustered_graph(num_entities=90)
    cfg = _cfg(**{"train.batching": "pairs", "train.pair_max_queries": 2})
    tr = ComplExTrainer(ds, cfg, tmp_path, progress=False)
    order, offsets = tr.epoch_batches(2)
    ref = PairIndex(torch.from_numpy(ds.queries("train"))).epoch_batches(cfg.train.seed, 2, cfg.train.batch_size, 2)
    assert torch.equal(order, ref[0]) and offsets == ref[1]


class Interrupt(Exception):
    pass


def test_pair_batched_training_learns_and_resumes_bit_identically(tmp_path):
    ds = clustered_graph(num_entities=90)
    cfg = _cfg(**{"train.batching": "pairs", "train.epochs": 6, "model.init_scale": 1e-3, "model.rank": 16,
                  "train.batch_size": 100})
    ref = ComplExTrainer(ds, cfg, tmp_path / "ref", progress=False)
    before = evaluate(ref.model, ds, "test")["realistic"]["mrr"]
    ref.fit()
    assert evaluate(ref.model, ds, "test")["realistic"]["mrr"] > max(0.15, before)

    def hook(epoch, batch):
        if (epoch, batch) == (3, 1):
            raise Interrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        ComplExTrainer(ds, cfg, run, progress=False, batch_hook=hook).fit()
    resumed = ComplExTrainer(ds, cfg, run, progress=False)
    resumed.fit(resume=True)
    assert torch.equal(resumed.model.entity, ref.model.entity)
    assert torch.equal(resumed.model.relation, ref.model.relation)
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "epoch" in json.loads(x)]
    assert epochs == list(range(1, 7))


@pytest.mark.parametrize("selector,extra", [("avg", {}), ("rl", {}), ("rl", {"distill.policy_state": "logits"}),
                                            ("rl", {"distill.kd": "dkd"}), ("best_teacher", {}), ("mulde", {}),
                                            ("single:text", {"distill.kd": "vanilla"})])
def test_stage_two_scores_each_pair_once_with_the_same_losses_and_gradients(tmp_path, selector, extra):
    """distill.batching=pairs in stage 2: the student and the teachers score each distinct (entity, relation) pair of
    the batch once, the policy reads each pair's state once, the CE uses each pair's log-sum-exp and NDKD runs once per
    distinct (pair, teacher weights) (losses that read the target, and MulDE, per query). On the same queries, losses
    (CE, KD, the policy's RC) and every gradient equal those of scoring each query on its own; the policy still samples
    one action per query."""
    from dsom.models.teachers import FrozenTeachers
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers(["structure", "text"], torch.randn(2, ds.num_entities, 16, generator=g),
                            torch.randn(2, 2 * ds.num_relations, 16, generator=g))
    cfg = _cfg(**{"distill.batching": "pairs", "distill.selector": selector, "distill.policy_hidden": 8,
                  "train.precision": "fp32", **extra})
    st = StudentTrainer(ds, cfg, tmp_path, frozen, progress=False)
    assert st.batching == "pairs"
    order, offsets = st.epoch_batches(1)
    batch = st.train_queries[order[offsets[0]:offsets[1]]]
    ph, pr, rows = group_pairs(batch)
    assert len(ph) < len(batch)  # the batch really repeats pairs
    nb = st._neighbour_mask(batch, batch)
    nb_pairs = st._neighbour_mask(batch, batch, pairs=(ph, pr, rows))
    assert nb_pairs.shape == (len(ph), ds.num_entities) and torch.equal(nb_pairs[rows], nb)  # one row per pair
    out = {}
    for mode in ("triples", "pairs"):
        st.model.zero_grad(set_to_none=True)
        losses, stats = st.model(batch, nb if mode == "triples" else nb_pairs, precision="fp32",
                                 generator=torch.Generator().manual_seed(3),
                                 pairs=(ph, pr, rows) if mode == "pairs" else None)
        sum(losses.values()).backward()
        out[mode] = ({k: v.detach() for k, v in losses.items()},
                     {n: p.grad.clone() for n, p in st.model.named_parameters() if p.grad is not None}, stats)
    (l1, g1, s1), (l2, g2, s2) = out["triples"], out["pairs"]
    assert set(l1) == set(l2) and ("rc" in l1) == (selector == "rl") and "kd" in l1
    for k in l1:
        torch.testing.assert_close(l2[k], l1[k], rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g2) and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6)
    if selector == "rl":
        assert torch.equal(s1["actions"], s2["actions"])
    state = st.fit()  # the trainer's own path: pair batches through group_pairs, to the end
    assert state.epoch == 4 and all(math.isfinite(v["value"]) for v in state.history)


def test_pair_kd_rows_are_the_distinct_pair_weight_rows_and_rebuild_every_query():
    from dsom.distill.actions import subset_matrix
    from dsom.distill.distiller import pair_kd_rows

    subsets = subset_matrix(3)
    rows = torch.tensor([2, 0, 2, 1, 0, 2, 3])
    actions = torch.tensor([6, 6, 6, 0, 3, 1, 6])
    u_pair, u_w, inverse = pair_kd_rows(rows, subsets[actions])
    # brute force: the set of distinct (pair, action)
    distinct = sorted({(p, a) for p, a in zip(rows.tolist(), actions.tolist())})
    assert len(u_pair) == len(distinct) == 6
    assert torch.equal(u_pair[inverse], rows) and torch.equal(u_w[inverse], subsets[actions])
    assert u_pair.tolist() == sorted(u_pair.tolist())
    # one weight row per pair: the distinct rows are the pairs 0..P-1 in order (the no-gather case)
    same = subsets[torch.tensor([6, 0, 6, 2, 0, 6, 1])]
    u_pair, _, inverse = pair_kd_rows(rows, same)
    assert u_pair.tolist() == [0, 1, 2, 3] and torch.equal(inverse, rows)


def test_gathered_kd_compiled_reads_the_rows_in_place_with_the_eager_values_and_gradients():
    from dsom.distill.distiller import gathered_kd
    from dsom.perf import MaybeCompiled

    cfg = Config().distill
    g = torch.Generator().manual_seed(4)
    P, E, M = 6, 23, 3
    tea = (torch.randn(M, P, E, generator=g) * 3).to(torch.bfloat16)
    nb = torch.rand(P, E, generator=g) < 0.2
    nb[:, 0] = True
    idx = torch.tensor([0, 0, 1, 3, 3, 3, 5])  # pairs repeated (different weights), pairs 2 and 4 unused
    w = torch.rand(len(idx), M, generator=g)
    out = {}
    for name, fn in (("eager", gathered_kd), ("compiled", MaybeCompiled(gathered_kd, True))):
        student = (torch.randn(P, E, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_()
        kd = fn(student, tea, idx, w, nb, cfg, "ndkd")
        kd.pow(2).sum().backward()
        out[name] = (kd.detach(), student.grad)
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["compiled"][1], out["eager"][1], rtol=1e-4, atol=1e-5)
    assert float(out["eager"][1][[2, 4]].abs().sum()) == 0.0 and float(out["eager"][1][3].abs().sum()) > 0


def test_each_stage_reads_its_own_batching_key(tmp_path):
    """train.batching sets stage 1 and a plain ComplEx, distill.batching the stage-2 student: pairs for the teachers
    and triples for the student (the defaults' recommendation) in one configuration."""
    from dsom.data.modality import ModalityTable
    from dsom.models.teachers import FrozenTeachers
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers(["structure", "text"], torch.randn(2, ds.num_entities, 16, generator=g),
                            torch.randn(2, 2 * ds.num_relations, 16, generator=g))
    feats = {"text": ModalityTable("text", np.ones((ds.num_entities, 5), np.float32), np.ones(ds.num_entities, bool))}

    def spans(tr) -> bool:  # whether some (entity, relation) pair's queries fall in two batches of epoch 1
        order, offsets = tr.epoch_batches(1)
        of = PairIndex(tr.train_queries_cpu).pair_of[order]
        batch_of = torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.tensor(np.diff(offsets)))
        return any(len(batch_of[of == p].unique()) > 1 for p in of.unique().tolist())

    for stage1, stage2 in (("pairs", "triples"), ("triples", "pairs"), ("auto", "triples"), ("triples", "auto")):
        cfg = _cfg(**{"train.batching": stage1, "distill.batching": stage2, "distill.policy_hidden": 8,
                      "modalities": ["structure", "text"]})
        used1, used2 = (("pairs" if b == "auto" else b) for b in (stage1, stage2))  # auto on a CPU: pairs
        assert ComplExTrainer(ds, cfg, tmp_path / f"c-{stage1}", progress=False).batching == used1
        teacher = TeacherTrainer(ds, cfg, tmp_path / f"t-{stage1}", feats, progress=False)
        st = StudentTrainer(ds, cfg, tmp_path / f"s-{stage1}", frozen, progress=False)
        assert (teacher.batching, st.batching) == (used1, used2)
        assert spans(teacher) == (used1 == "triples") and spans(st) == (used2 == "triples")


def test_auto_batching_is_pairs_on_a_cpu_and_triples_on_a_gpu():
    from dsom.errors import DsomError
    from dsom.train.loop import resolve_batching

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_batching("auto", cpu) == "pairs" and resolve_batching("auto", gpu) == "triples"
    for name in ("triples", "pairs"):
        assert resolve_batching(name, cpu) == resolve_batching(name, gpu) == name
    with pytest.raises(DsomError, match="not one of"):
        resolve_batching("pair", cpu)
