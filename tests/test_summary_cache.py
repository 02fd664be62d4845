"""The summary policy's state cache (``distill.summary_cache``): a training pair's state is a function of the frozen
teachers only, so after one epoch it is read instead of recomputed, with the same values."""

import pytest
import torch

import dsom.distill.policy as policy_module
from dsom.distill.policy import SummaryPolicy, summary_features
from dsom.train.student import StudentTrainer

from toy import clustered_graph, config, random_teachers

_BASE = {"model.rank": 8, "train.epochs": 2, "train.batch_size": 100, "train.valid_every": 0,
         "train.precision": "fp32", "train.seed": 5, "distill.policy_hidden": 8}


def _cfg(**kw):
    return config(_BASE, **kw)


_frozen = random_teachers


def test_the_policy_stores_states_until_every_pair_is_in_then_reads_them():
    g = torch.Generator().manual_seed(0)
    M, P, E = 3, 6, 20
    logits = torch.randn(M, P, E, generator=g) * 3
    pol = SummaryPolicy(M, 7, num_relations=4, num_entities=E, hidden=8, relation_dim=2, generator=g, cache_pairs=P)
    keys = torch.arange(P)
    zero = torch.zeros(P, dtype=torch.int64)
    pol(logits[:, :4], zero[:4], zero[:4], keys=keys[:4])
    assert not pol.cache.seal()  # pairs 4 and 5 were never seen: keep computing
    torch.testing.assert_close(pol.cache.values[:4], summary_features(logits[:, :4]))
    assert not bool(pol.cache.filled[4:].any())
    pol(logits[:, 3:], zero[3:], zero[3:], keys=keys[3:])
    assert pol.cache.seal()
    torch.testing.assert_close(pol.cache.values, summary_features(logits))
    # sealed: the logits are not read any more (zeros give the states of the real logits), repeated keys allowed
    rows = torch.tensor([5, 0, 3, 3, 1])
    rel = torch.tensor([1, 2, 3, 0, 1])
    got = pol(torch.zeros(M, len(rows), E), zero[:5], rel, keys=rows)
    want = pol(logits[:, rows], zero[:5], rel)  # no keys: computed from the logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batching", ["triples", "pairs"])
def test_after_one_epoch_the_trainer_reads_every_state_and_they_equal_a_direct_computation(tmp_path, monkeypatch,
                                                                                           batching):
    ds = clustered_graph(num_entities=60)
    frozen = _frozen(ds)
    rows_computed: list[int] = []
    real = policy_module.summary_features

    def counting(teacher_logits, compile=False):
        rows_computed.append(teacher_logits.shape[1])
        return real(teacher_logits, compile)

    monkeypatch.setattr(policy_module, "summary_features", counting)
    epochs: list[int] = []
    st = StudentTrainer(ds, _cfg(**{"distill.batching": batching}), tmp_path / "run", frozen, progress=False,
                        batch_hook=lambda epoch, batch: epochs.append(epoch))
    st.fit()
    per_epoch = {e: sum(n for n, ep in zip(rows_computed, epochs) if ep == e) for e in (1, 2)}
    queries = st.query_pairs
    expected_rows = len(st.train_queries)
    if batching == "pairs":  # each batch's distinct pairs (a pair cut into pieces, train.pair_max_queries, may recur)
        order, offsets = st.epoch_batches(1)
        expected_rows = sum(len(torch.unique(queries.pair_of[order[a:b]])) for a, b in zip(offsets, offsets[1:]))
        assert queries.num_pairs < expected_rows < len(st.train_queries)
    assert per_epoch == {1: expected_rows, 2: 0}
    cache = st.model.policy
    assert cache.cache.sealed and cache.cache.shape[0] == queries.num_pairs
    # independent: every pair's teacher logits scored directly (one block), their statistics
    q = st.train_queries_cpu
    first = torch.zeros(queries.num_pairs, dtype=torch.int64).scatter_(0, queries.pair_of.flip(0),
                                                                       torch.arange(len(q)).flip(0))
    head, rel = q[first, 0], q[first, 1]
    assert torch.equal(queries.pair_of[first], torch.arange(queries.num_pairs))
    want = real(st.model.teacher_scores(head, rel))
    torch.testing.assert_close(cache.cache.values, want, rtol=1e-5, atol=1e-6)


def test_the_cache_off_gives_the_same_training(tmp_path):
    ds = clustered_graph(num_entities=60)
    frozen = _frozen(ds)
    runs = {}
    for on in (True, False):
        st = StudentTrainer(ds, _cfg(**{"distill.summary_cache": on, "train.epochs": 3}), tmp_path / str(on), frozen,
                            progress=False)
        st.fit()
        runs[on] = st
    assert runs[True].model.policy.cache.sealed and runs[False].model.policy.cache is None
    for a, b in zip(runs[True].model.parameters(), runs[False].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state", ["summary", "logits"])
def test_greedy_actions_score_each_pair_once_and_equal_a_per_query_loop(tmp_path, state):
    """The Fig. 3 analysis (``greedy_actions``): pairs scored once per batch, or not at all where the sealed summary
    cache serves every state, and the same actions as scoring each query on its own."""
    ds = clustered_graph(num_entities=60)
    st = StudentTrainer(ds, _cfg(**{"distill.policy_state": state}), tmp_path / "run", _frozen(ds), progress=False)
    st.fit()
    model = st.model
    q = st.train_queries_cpu
    scored: list[int] = []
    real = model.teacher_scores

    def counting(head, relation, *args, **kw):
        scored.append(len(head))
        return real(head, relation, *args, **kw)

    model.teacher_scores = counting
    with torch.no_grad():
        loop = torch.stack([model.selector.greedy(real(q[i:i + 1, 0], q[i:i + 1, 1]), q[i:i + 1, 0], q[i:i + 1, 1],
                                                  q[i:i + 1, 2]) for i in range(len(q))]).flatten()
        by_pair = model.greedy_actions(q, 64)
        pairs = st.query_pairs
        assert pairs.num_pairs <= sum(scored) <= pairs.num_pairs + -(-len(q) // 64) < len(q)
        scored.clear()
        keyed = model.greedy_actions(q, 64, st._query_pair_ids)
    assert torch.equal(by_pair, loop) and torch.equal(keyed, loop)
    assert len(set(loop.tolist())) > 1  # not a constant policy
    if state == "summary":
        assert scored == []  # the sealed cache served every pair's state
    else:
        assert pairs.num_pairs <= sum(scored) < len(q)
