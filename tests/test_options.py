"""Options and code paths no other test executed (issue 17, item 5): the full-logit policy states, the KD warm-up,
the metrics tracker, dataset lookup by name, and the paper-table ablations (Tables 2 and 4, the dimension study)
through the real command, including the policy trained on valid (``rc_on_val``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dsom.cli import main
from dsom.config import Config, apply_dict
from dsom.distill.policy import policy_state
from dsom.train.student import StudentTrainer
from dsom.train.tracker import JsonlTracker

from toy import clustered_graph, random_teachers, write_canonical


@pytest.mark.parametrize("kind", ["logits", "probs", "standardised"])
def test_full_logit_policy_states_against_numpy(kind):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 7, generator=g) * 3  # (M, B, E)
    x = z.double().numpy()
    if kind == "probs":
        x = np.exp(x - x.max(-1, keepdims=True))
        x = x / x.sum(-1, keepdims=True)
    elif kind == "standardised":
        x = (x - x.mean(-1, keepdims=True)) / x.std(-1, ddof=1, keepdims=True)
    expect = np.concatenate([x[m] for m in range(3)], axis=1)  # row b = [teacher 0's E values, teacher 1's, ...]
    got = policy_state(z.requires_grad_(), kind)
    assert got.shape == (4, 21) and not got.requires_grad
    np.testing.assert_allclose(got.double().numpy(), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown full-logit policy state"):
        policy_state(z, "summary")


@pytest.mark.parametrize("kind", ["probs", "standardised"])
def test_a_student_trains_with_a_full_logit_policy_state(tmp_path, kind):
    ds = clustered_graph(num_entities=40)
    cfg = _cfg({"distill.policy_state": kind, "distill.policy_relation_dim": 0, "train.epochs": 1})
    st = StudentTrainer(ds, cfg, tmp_path, _teachers(ds), progress=False)
    before = [p.detach().clone() for p in st.model.selector.parameters()]
    st.fit()
    assert st.model.selector.policy.net[0].in_features == 3 * ds.num_entities
    assert any(float((p.detach() - b).abs().max()) > 0 for p, b in zip(st.model.selector.parameters(), before))


def test_kd_warmup_scales_the_kd_term_linearly(tmp_path):
    ds = clustered_graph(num_entities=40)
    batch = torch.from_numpy(ds.queries("train")[:64])
    kd = {}
    for warmup in (0, 4):
        st = StudentTrainer(ds, _cfg({"distill.kd_warmup_epochs": warmup, "distill.selector": "avg"}),
                            tmp_path / str(warmup), _teachers(ds), progress=False)
        for epoch in (1, 2, 4, 6):
            st.current_epoch, st.current_batch = epoch, 0
            kd[warmup, epoch] = float(st.loss(batch).terms["kd"].detach())
    for epoch in (1, 2, 4, 6):
        assert kd[4, epoch] == pytest.approx(kd[0, epoch] * min(1.0, epoch / 4), rel=1e-6)


def test_tracker_cleans_non_finite_values_and_truncates_a_resumed_stage(tmp_path):
    tr = JsonlTracker(tmp_path / "sub" / "metrics.jsonl")
    tr.log_params({"rank": 8})
    for stage in ("pretrain", "distill"):
        for epoch in (1, 2, 3):
            tr.log_metrics({"loss": math.nan if epoch == 2 else 1.0 / epoch, "inf": [math.inf]}, stage=stage,
                           epoch=epoch)
    with tr.path.open("a") as fh:
        fh.write('{"stage": "pretrain", "epo')  # a line cut by a kill
    tr.truncate_after("pretrain", 1)
    recs = [json.loads(x) for x in tr.path.read_text().splitlines()]
    assert recs[0] == {"event": "params", "rank": 8}
    assert [(r["stage"], r["epoch"]) for r in recs[1:]] == [("pretrain", 1), ("distill", 1), ("distill", 2),
                                                             ("distill", 3)]
    assert recs[3]["loss"] is None and recs[3]["inf"] == [None]


def test_a_dataset_is_found_by_name_under_dsom_data(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    write_canonical(clustered_graph(num_entities=30), root / "toykg")
    monkeypatch.setenv("DSOM_DATA", str(root))
    out = tmp_path / "run"
    assert main(["run", "toykg", "-o", str(out), "--rank", "4", "--epochs", "1", "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["entities"] == 30
    capsys.readouterr()
    assert main(["run", "toykh", "-o", str(tmp_path / "r2"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "toykh" in err and len(err.strip().splitlines()) == 1


TINY = ["--rank", "8", "--epochs", "2", "--set", "data.synthetic.num_train=2000", "--set",
        "data.synthetic.num_entities=300", "--set", "ensemble.mi_epochs=1", "--set", "distill.policy_hidden=16",
        "--set", "train.valid_every=1", "--set", "distill.variants=[]", "--set", "train.threads=1", "-q"]


@pytest.fixture(scope="module")
def teachers_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers") / "run"
    assert main(["pretrain", "-o", str(out), *TINY]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("table,expect", [
    ("table2", ["student/conf", "student/best_teacher", "student/best_strategy", "student/mulde"]),
    ("table4", ["student/ndkd_avg", "student/nekd", "student/nnkd", "student/vanilla_kd", "student/dkd",
                "rc_on_val"]),
    ("dim", ["student/rank:4", "student/rank:2", "student/rank:1"]),  # teachers of rank 8: halvings
])
def test_paper_table_ablations_train_and_report_every_variant(teachers_run, tmp_path, table, expect):
    out = tmp_path / table
    assert main(["distill", "--teachers", str(teachers_run), "-o", str(out), "--ablation", table, *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(expect) <= set(res["models"])
    mrr = {k: res["models"][k]["test"]["realistic"]["mrr"] for k in ["student", *expect]}
    assert all(0 < v <= 1 for v in mrr.values())
    assert len({round(v, 9) for v in mrr.values()}) > len(mrr) // 2  # variants really differ, not one model copied
    if table == "dim":
        students = res["distill"]["students"]
        key = next(k for k in students if k.endswith("rank:4"))
        assert students[key]["parameters"] == 2 * 4 * (300 + 2 * 24)


def _cfg(extra: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, {"model.rank": 8, "train.epochs": 2, "train.batch_size": 100, "train.valid_every": 0,
                     "train.precision": "fp32", "train.seed": 5, "distill.policy_hidden": 8, **extra})
    return cfg


_teachers = random_teachers


def test_dimension_study_ranks():
    from dsom.runs.variants import student_dims

    assert student_dims(2000) == [1000, 512, 256, 128, 64]
    assert student_dims(500) == [256, 128, 64]
    assert student_dims(64) == [32, 16, 8, 4, 2] and student_dims(8) == [4, 2, 1] and student_dims(1) == []


def test_a_run_logs_its_plan_and_an_estimate_per_stage(tmp_path, caplog):
    import logging

    d = tmp_path / "kg"
    write_canonical(clustered_graph(num_entities=40), d)
    with caplog.at_level(logging.INFO, logger="dsom"):
        assert main(["run", str(d), "-o", str(tmp_path / "r"), "--rank", "4", "--epochs", "3", "--batch-size", "20",
                     "--set", "distill.holdout=0", "--set", "distill.epochs=2", "--set", "train.batching=triples",
                     "-q"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    plan = [x for x in lines if x.startswith("plan: ")]
    train = 2 * len(clustered_graph(num_entities=40).train)
    assert plan == [f"plan: teachers structure rank 4, up to 3 epochs of {-(-train // 20):,} batches ({train:,} "
                    "queries), early stopping after 10 epochs without gain; ensembles teacher_avg, mose_bi, mose_mi; "
                    "1 student (student) rank 4, 2 epochs each; each stage's time capped by train.max_minutes (auto: "
                    "60 min on a CPU, none on a GPU; 0 = no cap)"]
    eta = [x for x in lines if " s per epoch (" in x]
    assert [x.split(":")[0] for x in eta] == ["pretrain", "distill"]
    assert "3 epochs to go" in eta[0] and "2 epochs to go" in eta[1]


def test_the_plan_says_where_batches_are_pairs_and_how_many_queries_a_pair_has(tmp_path, caplog):
    import logging

    ds = clustered_graph(num_entities=40)
    d = tmp_path / "kg"
    write_canonical(ds, d)
    keys = {(h, r) for h, r, t in ds.train} | {(t, -1 - r) for h, r, t in ds.train}  # reciprocal queries' pairs
    per_pair = 2 * len(ds.train) / len(keys)
    assert per_pair > 1.2
    with caplog.at_level(logging.INFO, logger="dsom"):
        assert main(["pretrain", str(d), "-o", str(tmp_path / "r"), "--rank", "4", "--epochs", "1", "--batch-size",
                     "20", "--set", "train.batching=pairs", "--set", "ensemble.models=[]", "-q"]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert len(plan) == 1 and "epochs of about " in plan[0] and " queries, pair batches)" in plan[0]
    assert f"; {per_pair:.2f} training queries per (entity, relation) pair (pair batches:" in plan[0]
    k = Config().train.pair_max_queries
    assert (f"pieces of at most {k} queries" if k else "whole pairs, less accurate") in plan[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsom"):
        assert main(["pretrain", str(d), "-o", str(tmp_path / "w"), "--rank", "4", "--epochs", "1", "--batch-size",
                     "20", "--set", "train.batching=pairs", "--set", f"train.pair_max_queries={0 if k else 3}",
                     "--set", "ensemble.models=[]", "-q"]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert ("whole pairs, less accurate" if k else "pieces of at most 3 queries") in plan[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsom"):
        assert main(["pretrain", str(d), "-o", str(tmp_path / "t"), "--rank", "4", "--epochs", "1", "--batch-size",
                     "20", "--set", "train.batching=triples", "--set", "ensemble.models=[]", "-q"]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert len(plan) == 1 and "pair" not in plan[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsom"):  # the default, auto: pairs on this CPU
        assert main(["pretrain", str(d), "-o", str(tmp_path / "a"), "--rank", "4", "--epochs", "1", "--batch-size",
                     "20", "--set", "ensemble.models=[]", "-q"]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
    assert len(plan) == 1 and " queries, pair batches)" in plan[0]
