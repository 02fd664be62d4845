"""The policy's reward cache (``distill.reward_cache``): every subset's reward CE on a rewarded training triple is a
function of the frozen teachers only, so after one epoch it is read, and the teachers are scored only where the chosen
subsets need them for the distillation loss."""

import pytest
import torch

from dsom.distill.selectors import _all_action_ces
from dsom.train.student import StudentTrainer

from toy import clustered_graph, config, random_teachers

_BASE = {"model.rank": 8, "train.epochs": 3, "train.batch_size": 100, "train.valid_every": 0,
         "train.precision": "fp32", "train.seed": 5, "distill.policy_hidden": 8}


def _cfg(**kw):
    return config(_BASE, **kw)


def _held_out(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.3


def _trainer(ds, frozen, path, rewards: str, hook=None, **kw) -> StudentTrainer:
    n = len(ds.queries("train"))
    rows = _held_out(n) if rewards == "holdout" else None
    return StudentTrainer(ds, _cfg(**kw), path, frozen, progress=False, reward_rows=rows, batch_hook=hook)


def _count_rows(st: StudentTrainer) -> list[list[int]]:
    """Wrap the teachers and the selector of ``st``: per step ``[teacher rows scored, rows the chosen weights read]``."""
    teachers, sel = st.model.teachers, st.model.selector
    steps: list[list[int]] = []
    logits, row_logits, select = teachers.logits, teachers.row_logits, sel.select

    def counted(head, relation, precision="fp32", scale=None, queries=None, rows=None):
        steps[-1][0] += teachers.num_teachers * len(head) if rows is None else int(rows.sum())
        return logits(head, relation, precision, scale, *(() if queries is None else (queries,)), rows=rows)

    def counted_rows(head, relation, rows, *args, **kwargs):
        steps[-1][0] += int(rows.sum())
        return row_logits(head, relation, rows, *args, **kwargs)

    def selecting(batch):
        steps.append([0, 0])
        out = select(batch)
        steps[-1][1] = int((out.weights != 0).sum())
        return out

    teachers.logits, teachers.row_logits, sel.select = counted, counted_rows, selecting
    return steps


@pytest.mark.parametrize("rewards", ["all", "holdout"])
def test_from_the_second_epoch_the_teachers_are_scored_only_where_the_chosen_subsets_read_them(tmp_path, rewards):
    ds = clustered_graph(num_entities=60)
    frozen = random_teachers(ds)
    epochs: list[int] = []
    st = _trainer(ds, frozen, tmp_path / "run", rewards, lambda epoch, batch: epochs.append(epoch),
                  **{"train.epochs": 2})
    steps = _count_rows(st)
    st.fit()
    assert len(steps) == len(epochs) and epochs.count(2) > 1
    sel = st.model.selector
    assert sel.reward_cache.sealed and st.model.policy.cache.sealed
    M = frozen.num_teachers
    for (scored, chosen), epoch in zip(steps, epochs):
        if epoch == 2:
            assert scored == chosen  # no teacher on a reward row its subset does not read
    # the first epoch scores every teacher on every row (the summary states and the reward CEs are computed)
    first = [(s, c) for (s, c), e in zip(steps, epochs) if e == 1]
    assert all(s >= c for s, c in first) and sum(s for s, _ in first) == M * len(st.train_queries)
    assert sum(c for (_, c), e in zip(steps, epochs) if e == 2) < M * len(st.train_queries)


@pytest.mark.parametrize("rewards", ["all", "holdout"])
def test_the_cache_holds_every_subsets_ce_of_every_rewarded_query(tmp_path, rewards):
    ds = clustered_graph(num_entities=60)
    frozen = random_teachers(ds)
    st = _trainer(ds, frozen, tmp_path / "run", rewards, **{"train.epochs": 1})
    st.fit()
    sel = st.model.selector
    q = st.train_queries_cpu
    rewarded = torch.ones(len(q), dtype=torch.bool) if rewards == "all" else _held_out(len(q))
    q = q[rewarded]
    assert sel.reward_cache.sealed and sel.reward_cache.shape == (len(q), sel.subsets.shape[0])
    # independent: the calibrated teachers scored directly, every subset's CE in float64, one query at a time
    tea = st.model.teacher_scores(q[:, 0], q[:, 1]).double()
    subsets = sel.subsets.double()
    want = torch.stack([_all_action_ces(tea[:, i:i + 1], subsets, q[i:i + 1, 2], st.cfg.distill.reward_tau)[:, 0]
                        for i in range(len(q))])
    torch.testing.assert_close(sel.reward_cache.values.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rewards,baseline,batching", [("all", "expected", "triples"),
                                                       ("holdout", "expected", "triples"),
                                                       ("all", "avg_action", "triples"),
                                                       ("holdout", "expected", "pairs")])
def test_the_cache_off_gives_the_same_training(tmp_path, rewards, baseline, batching):
    ds = clustered_graph(num_entities=60)
    frozen = random_teachers(ds)
    runs = {}
    for on in (True, False):
        st = _trainer(ds, frozen, tmp_path / str(on), rewards, **{
            "distill.reward_cache": on, "distill.baseline": baseline, "distill.batching": batching})
        st.fit()
        runs[on] = st
    assert runs[True].model.selector.reward_cache.sealed and runs[False].model.selector.reward_cache is None
    for a, b in zip(runs[True].model.parameters(), runs[False].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_resumed_trainer_reads_the_saved_cache(tmp_path):
    ds = clustered_graph(num_entities=60)
    frozen = random_teachers(ds)
    st = _trainer(ds, frozen, tmp_path / "a", "holdout", **{"train.epochs": 1})
    st.fit()
    state = st.extra_train_state()
    fresh = _trainer(ds, frozen, tmp_path / "b", "holdout", **{"train.epochs": 1})
    assert not fresh.model.selector.reward_cache.sealed
    fresh.load_extra_train_state(state)
    assert fresh.model.selector.reward_cache.sealed
    torch.testing.assert_close(fresh.model.selector.reward_cache.values, st.model.selector.reward_cache.values, rtol=0,
                               atol=0)
