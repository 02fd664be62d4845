"""Stage 1: joint teacher training, multi-view ranking, the oracle, MoSE-BI/MI, clean valid, the pipeline."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsom.cli import main
from dsom.config import Config, set_value
from dsom.data import registry
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.distill.holdout import teacher_dataset
from dsom.ensemble import (
    MetaLearner,
    WeightedTeachers,
    boosting_from_counts,
    boosting_weights,
    pattern_counts,
    train_meta_learner,
)
from dsom.errors import ConfigError
from dsom.evaluate import evaluate, split_counts
from dsom.models.complex import ComplEx
from dsom.models.teachers import AllViews, FrozenTeachers
from dsom.runs.results import ensemble_results
from dsom.train.checkpoint import load_checkpoint
from dsom.train.teachers import TeacherTrainer

from toy import clustered_graph, random_graph, write_canonical


def _cfg(**kw):
    cfg = Config()
    base = {"model.rank": 8, "train.epochs": 4, "train.batch_size": 128, "train.valid_every": 2,
            "train.precision": "fp32", "train.seed": 3, "modalities": ["structure", "text", "numeric"]}
    base.update(kw)
    for k, v in base.items():
        set_value(cfg, k, v)
    return cfg


def _features(ds: KGDataset, seed: int = 0) -> dict[str, ModalityTable]:
    rng = np.random.default_rng(seed)
    E = ds.num_entities
    out = {}
    for name, dim in (("text", 12), ("numeric", 5)):
        present = rng.random(E) > 0.2
        out[name] = ModalityTable.from_partial(name, rng.normal(size=(E, dim)).astype(np.float32), present)
    return out


def _frozen(ds: KGDataset, M: int = 3, d: int = 4, seed: int = 0) -> FrozenTeachers:
    g = torch.Generator().manual_seed(seed)
    tables = torch.randn(M, ds.num_entities, 2 * d, generator=g)
    relations = torch.randn(M, 2 * ds.num_relations, 2 * d, generator=g)
    return FrozenTeachers([f"m{i}" for i in range(M)], tables, relations)


def test_joint_loss_is_the_sum_of_independent_complex_losses(tmp_path):
    ds = random_graph()
    cfg = _cfg()
    tr = TeacherTrainer(ds, cfg, tmp_path, _features(ds), progress=False)
    batch = torch.from_numpy(ds.queries("train")[:50])
    step = tr.loss(batch)
    loss, terms = step.total, step.detached()
    h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
    ref = 0.0
    tables = tr.model.entity_tables().detach()
    for m in range(3):
        cx = ComplEx(ds.num_entities, 2 * ds.num_relations, 8)
        with torch.no_grad():
            cx.entity.copy_(tables[m])
            cx.relation.copy_(tr.model.relations[m])
        ce = F.cross_entropy(cx.score_all(h, r), t)
        f = cx.factors(h, r, t)
        ce, f = ce.detach(), [x.detach() for x in f]
        ref += float(ce) + 0.01 * sum(float(x.pow(3).sum()) for x in f) / len(t)
        assert math.isclose(float(terms[f"ce/{tr.model.modalities[m]}"]), float(ce), rel_tol=1e-5)
    assert math.isclose(float(loss.detach()), ref, rel_tol=1e-5)


def test_all_views_ranks_equal_separate_evaluations_and_oracle_is_the_min():
    ds = random_graph(num_entities=50, num_triples=300)
    frozen = _frozen(ds)
    counts, n = split_counts(AllViews(frozen), ds, "test", memory_budget_mb=0.01)  # forces entity chunking
    assert counts.greater.shape == (4, 2 * n)
    for k, m in enumerate(frozen.modalities + [None]):
        scorer = frozen.view(None if m is None else [m])
        single, _ = split_counts(scorer, ds, "test")
        assert torch.equal(single.greater, counts.greater[k]) and torch.equal(single.equal, counts.equal[k])
    # Brute-force oracle: per query, the best pessimistic rank over the three teachers.
    q = torch.from_numpy(ds.queries("test"))
    scores = frozen.score_all(q[:, 0], q[:, 1])
    best = []
    for i, (e, r, t) in enumerate(q.tolist()):
        known = set(ds.filter_index.answers_of(e, r).tolist()) - {t}
        ranks = []
        for m in range(3):
            row = scores[m, i]
            ranks.append(1 + sum(1 for c in range(ds.num_entities) if c != t and c not in known and row[c] >= row[t]))
        best.append(min(ranks))
    from dsom.train.teachers import view_metrics

    views = view_metrics(counts, n, frozen.modalities)
    assert math.isclose(views["teacher_oracle"]["pessimistic"]["mrr"], float(np.mean(1.0 / np.array(best))),
                        rel_tol=1e-9)


def _dense_mose_boosting(scores, targets, filt, M):
    """MoSE-BI on explicit T x E matrices, written from the SPEC §3 description."""
    T, E = scores.shape[1:]
    p = np.where((scores < targets[:, :, None]) | filt[None], 1.0, -1.0)
    D = np.full((T, E), 1.0 / E)
    acc = np.zeros(M)
    for _ in range(M):
        w = np.array([0.5 * np.log((D[p[m] > 0].sum() + 1e-10) / (D[p[m] < 0].sum() + 1e-10)) for m in range(M)])
        cand = np.where(acc <= 0, w, -np.inf)
        b = int(np.argmax(cand))
        acc[b] += w[b]
        D = D * np.exp(-w[b] * p[b])
        D = D / D.sum()
    return acc


def test_boosting_on_pattern_counts_equals_the_dense_procedure():
    ds = random_graph(num_entities=40, num_relations=2, num_triples=300, valid=120, test=20)
    frozen = _frozen(ds, M=3)
    weights = boosting_weights(frozen, ds, "valid", min_queries=10)
    q = ds.queries("valid")
    scores = frozen.score_all(torch.from_numpy(q[:, 0]), torch.from_numpy(q[:, 1])).numpy()
    checked = 0
    for r in range(2 * ds.num_relations):
        rows = np.flatnonzero(q[:, 1] == r)
        if len(rows) < 10:
            assert torch.allclose(weights[r], torch.full((3,), 1 / 3))
            continue
        s = scores[:, rows]
        targets = s[:, np.arange(len(rows)), q[rows, 2]]
        filt = np.zeros((len(rows), ds.num_entities), dtype=bool)
        for i, row in enumerate(rows):
            filt[i, ds.filter_index.answers_of(int(q[row, 0]), r)] = True
            filt[i, q[row, 2]] = True
        ref = _dense_mose_boosting(s, targets, filt, 3)
        np.testing.assert_allclose(weights[r].numpy(), ref, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 2


def test_ensembles_fit_on_the_train_triples_held_out_from_the_teachers():
    # 5 valid triples: every relation would get uniform MoSE-BI weights; the held-out slice of train is large
    ds = random_graph(num_entities=40, num_relations=2, num_triples=700, valid=5, test=20)
    frozen = _frozen(ds, M=3)
    cpu = torch.device("cpu")
    on_valid = _cfg(**{"ensemble.models": ["mose_bi"], "distill.holdout": 0.3})
    _, info_valid = ensemble_results(frozen, ds, on_valid, cpu, False)
    assert info_valid["fitted_on"] == {"split": "valid", "triples": 5}
    assert info_valid["mose_bi"]["uniform_relations"] == 4
    cfg = _cfg(**{"ensemble.models": ["mose_bi"], "distill.holdout": 0.3, "ensemble.fit_on": "holdout"})
    _, info = ensemble_results(frozen, ds, cfg, cpu, False)
    # the fitting triples are exactly the train triples the teachers did not train on
    keys = lambda a: {tuple(t) for t in a.tolist()}  # noqa: E731
    held = np.array(sorted(keys(ds.train) - keys(teacher_dataset(ds, 0.3, cfg.distill.holdout_seed).train)))
    assert len(held) == round(0.3 * len(ds.train))
    assert info["fitted_on"] == {"split": "held-out train triples", "triples": len(held)}
    ref = boosting_weights(frozen, ds.with_split("valid", held), "valid", cfg.ensemble.bi_min_queries)
    assert info["mose_bi"]["uniform_relations"] == int((ref == 1 / 3).all(1).sum()) < 4
    assert info["mose_bi"]["mean_weight"] == {m: round(float(x), 4) for m, x in zip(frozen.modalities, ref.mean(0))}
    with pytest.raises(ConfigError, match="distill.holdout"):
        ensemble_results(frozen, ds, _cfg(**{"ensemble.fit_on": "holdout", "distill.holdout": 0.0}), cpu, False)


def test_pattern_counts_cover_every_cell_and_uniform_weights_give_the_mean():
    ds = random_graph(num_entities=30, num_triples=200)
    frozen = _frozen(ds)
    q = ds.queries("valid")
    c = pattern_counts(frozen, ds, q, batch_size=7)
    assert float(c.sum()) == len(q) * ds.num_entities
    per_rel = np.bincount(q[:, 1], minlength=2 * ds.num_relations) * ds.num_entities
    np.testing.assert_allclose(c.sum(1).numpy(), per_rel)
    # a perfect agreement of all teachers on one relation: a single (all -1 or all +1) pattern per cell
    w = torch.full((2 * ds.num_relations, 3), 1 / 3)
    h, r = torch.arange(5), torch.arange(5) % 4
    torch.testing.assert_close(WeightedTeachers(frozen, w).score_all(h, r), frozen.view().score_all(h, r))
    assert boosting_from_counts(torch.tensor([0.0] * 7 + [5.0], dtype=torch.float64), 3, 10).shape == (3,)


def test_meta_learner_learns_to_follow_the_informative_teacher(tmp_path):
    ds = clustered_graph(num_entities=80, holdout=0.3)
    # teacher 0 knows the graph (a trained ComplEx), teacher 1 is noise
    cfg = _cfg(**{"modalities": ["structure"], "model.rank": 16, "train.epochs": 10, "train.valid_every": 0})
    from dsom.train.loop import ComplExTrainer

    tr = ComplExTrainer(ds, cfg, tmp_path, progress=False)
    tr.fit()
    good = tr.model.entity.detach()
    g = torch.Generator().manual_seed(1)
    tables = torch.stack([good, torch.randn(good.shape, generator=g)])
    rels = torch.stack([tr.model.relation.detach(), torch.randn(tr.model.relation.shape, generator=g)])
    frozen = FrozenTeachers(["good", "noise"], tables, rels)
    ec = Config().ensemble
    ec.mi_epochs = 8
    scorer, info = train_meta_learner(frozen, ds, ec)
    assert 1 <= info["epoch"] <= 8 and info["holdout_triples"] > 0
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    mi = evaluate(scorer, ds, "test")["realistic"]["mrr"]
    noise = evaluate(frozen.view(["noise"]), ds, "test")["realistic"]["mrr"]
    assert mi > 2 * noise
    assert MetaLearner(3)(torch.randn(3, 4, 5)).shape == (4, 5)


def test_meta_learner_relu_output_can_die_and_the_linear_one_cannot():
    """MoSE's final ReLU: once the last pre-activation is negative for every input, every candidate scores 0,
    the CE is log N for every query and no parameter gets a gradient (MKG-Y's MoSE-MI: loss 9.6158 = log 15000
    in every epoch). The linear output keeps a gradient from the same weights."""
    torch.manual_seed(0)
    scores, target = torch.randn(2, 8, 30), torch.randint(0, 30, (8,))
    grads = {}
    for output in ("relu", "linear"):
        net = MetaLearner(2, 16, output)
        with torch.no_grad():
            net.net[2].bias.fill_(-100.0)
        out = net(scores)
        loss = F.cross_entropy(out, target)
        loss.backward()
        grads[output] = max(float(p.grad.abs().max()) for p in net.parameters())
        if output == "relu":
            assert float(out.detach().abs().max()) == 0.0 and loss.item() == pytest.approx(math.log(30))
    assert grads["relu"] == 0.0 and grads["linear"] > 1e-3
    with pytest.raises(ValueError, match="linear or relu"):
        MetaLearner(2, 4, "tanh")


@pytest.mark.parametrize("output", ["linear", "relu"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 64, 1000), (4, 1, 9)])
def test_blocked_meta_learner_equals_the_whole_block_definition(output, shape):
    """MetaLearner.forward (blocks of candidates, recomputed backward) against nn.Sequential on the whole block:
    the same outputs and parameter gradients, with blocks smaller than N and a non-uniform incoming gradient."""
    torch.manual_seed(1)
    net = MetaLearner(shape[0], 16, output)
    with torch.no_grad():
        net.net[2].bias.fill_(0.05)  # some outputs on both sides of the final ReLU
    scores = torch.randn(*shape, dtype=torch.float64)
    net = net.double()
    w = torch.rand(shape[1], shape[2], dtype=torch.float64)
    grads = []
    for fn in (net.reference, net.forward):
        net.zero_grad()
        out = fn(scores)
        (out * w).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b)


def test_clean_valid_drops_shared_and_repeated_triples_but_keeps_filtering():
    ds = random_graph()
    valid = np.concatenate([ds.valid, ds.train[:5], ds.test[:3], ds.valid[:2]])
    ds = ds.with_split("valid", valid)
    before = ds.filter_index
    clean, dropped = ds.clean_valid()
    assert dropped == 10 and len(clean.valid) == len(valid) - 10
    assert clean.filter_index is before


def test_run_with_feature_modalities_writes_every_model(tmp_path, capsys):
    ds = clustered_graph(num_entities=60)
    folder = tmp_path / "kg"
    write_canonical(ds, folder)
    feats = np.random.default_rng(0).normal(size=(ds.num_entities, 6)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    out = tmp_path / "run"
    argv = ["pretrain", str(folder), "-o", str(out), "--rank", "4", "--epochs", "3", "--modalities", "structure,vis",
            "--set", f"features.files.vis={tmp_path / 'f.npy'}", "--set", "ensemble.mi_epochs=2", "-q"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"teacher/structure", "teacher/vis", "teacher_avg", "mose_bi", "mose_mi"}
    assert res["features"]["vis"]["shape"] == [ds.num_entities, 6]
    assert res["parameters"]["teachers"] == res["parameters"]["teachers_formula"] == 2 * 4 * (
        ds.num_entities + 2 * 2 * ds.num_relations + 6)
    ck = load_checkpoint(out)
    assert ck.teachers is not None and ck.teachers.modalities == ["structure", "vis"]
    m = evaluate(ck.model, registry.load(str(folder)), "test")
    assert m["realistic"] == res["models"]["teacher_avg"]["test"]["realistic"]


def test_unknown_modality_is_a_config_error(capsys):
    assert main(["run", "--modalities", "structure,smell", "-q"]) == 2
    err = capsys.readouterr().err
    assert "smell" in err and "features.files.smell" in err


class Interrupt(Exception):
    pass


def test_teacher_training_resumes_bit_identically_and_selects_on_the_oracle(tmp_path):
    ds = clustered_graph(num_entities=90)
    cfg = _cfg(**{"train.epochs": 5, "train.batch_size": 100})
    feats = _features(ds)
    ref = TeacherTrainer(ds, cfg, tmp_path / "ref", feats, progress=False)
    ref_state = ref.fit()

    def hook(epoch, batch):
        if (epoch, batch) == (3, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        TeacherTrainer(ds, cfg, tmp_path / "run", feats, progress=False, batch_hook=hook).fit()
    resumed = TeacherTrainer(ds, cfg, tmp_path / "run", feats, progress=False)
    state = resumed.fit(resume=True)
    for a, b in zip(resumed.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)
    assert state.best_epoch == ref_state.best_epoch
    # the selection value logged is the oracle's valid hits@10, at least every single teacher's
    records = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "valid" in r]
    for r in val:
        oracle = r["valid"]["teacher_oracle"]["realistic"]["hits@10"]
        assert r["selection_value"] == oracle
        assert all(oracle >= r["valid"][f"teacher/{m}"]["realistic"]["hits@10"] - 1e-12
                   for m in ("structure", "text", "numeric"))
    frozen = ref.save_final()
    torch.testing.assert_close(frozen.tables, ref.model.entity_tables().detach())
