"""Differential test: dsom's filtered evaluation vs PyKEEN's RankBasedEvaluator on the same embeddings.

PyKEEN stores complex embeddings interleaved (re0, im0, re1, im1, ...) and scores head queries with
the original relation, while dsom uses [re | im] rows and reciprocal relations. Setting each reciprocal
relation row to the conjugate of the original makes both compute the same scores:
Re(<t, conj(r), conj(h)>) = Re(<h, r, conj(t)>).
"""

import pytest
import torch

from dsom.evaluate import evaluate
from dsom.models.complex import ComplEx

from toy import clustered_graph, random_graph

pykeen = pytest.importorskip("pykeen", reason="install the [pykeen] extra for the differential test")


def _to_interleaved(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1] // 2
    return torch.stack([x[:, :d], x[:, d:]], dim=-1).reshape(x.shape[0], 2 * d)


def _pykeen_metrics(ds, model: ComplEx, split: str) -> dict:
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import ComplEx as PKComplEx
    from pykeen.triples import TriplesFactory

    R = ds.num_relations
    tf = TriplesFactory(mapped_triples=torch.from_numpy(ds.train),
                        entity_to_id={label: i for i, label in enumerate(ds.entities.labels)},
                        relation_to_id={label: i for i, label in enumerate(ds.relations.labels)})
    pk = PKComplEx(triples_factory=tf, embedding_dim=model.rank, random_seed=0)
    with torch.no_grad():
        pk.entity_representations[0]._embeddings.weight.copy_(_to_interleaved(model.entity))
        pk.relation_representations[0]._embeddings.weight.copy_(_to_interleaved(model.relation[:R]))
    ev = RankBasedEvaluator(filtered=True)
    res = ev.evaluate(pk, mapped_triples=torch.from_numpy(ds.splits[split]), batch_size=64,
                      additional_filter_triples=[torch.from_numpy(ds.train), torch.from_numpy(ds.valid),
                                                 torch.from_numpy(ds.test)], use_tqdm=False)
    return res


@pytest.mark.parametrize("graph", ["random", "clustered"])
def test_same_metrics_as_pykeen(graph):
    ds = random_graph(num_entities=80, num_relations=4, num_triples=600, seed=7) if graph == "random" \
        else clustered_graph(num_entities=120, num_relations=3)
    R = ds.num_relations
    model = ComplEx(ds.num_entities, 2 * R, 6, init_scale=1.0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # reciprocal relation = conjugate of the original
        d = model.rank
        model.relation[R:, :d] = model.relation[:R, :d]
        model.relation[R:, d:] = -model.relation[:R, d:]
    ours = evaluate(model, ds, "test")
    res = _pykeen_metrics(ds, model, "test")
    compared = 0
    for policy in ("realistic", "pessimistic", "optimistic"):
        for side, block in (("both", ours), ("head", ours["head"]), ("tail", ours["tail"])):
            mine = block[policy]
            for metric, key in (("mrr", "inverse_harmonic_mean_rank"), ("mr", "arithmetic_mean_rank"),
                                ("hits@1", "hits_at_1"), ("hits@3", "hits_at_3"), ("hits@10", "hits_at_10")):
                theirs = res.get_metric(f"{side}.{policy}.{key}")
                assert mine[metric] == pytest.approx(theirs, rel=1e-5, abs=1e-6), (side, policy, metric)
                compared += 1
    assert compared == 45
    print(f"\nPyKEEN agreement ({graph}): test realistic MRR dsom={ours['realistic']['mrr']:.6f} "
          f"pykeen={res.get_metric('both.realistic.inverse_harmonic_mean_rank'):.6f}; 45 metrics equal")
