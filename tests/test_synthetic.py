"""Tests of the synthetic multimodal KG generator (dsom.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsom.data.graph import SPLITS
from dsom.data.modality import ModalityTable
from dsom.data.synthetic import (
    HELPFUL,
    MISLEADING,
    SYNTHETIC_DEFAULTS,
    UNINFORMATIVE,
    SyntheticTruth,
    _sample_tails,
    generate_synthetic,
    resolve_synthetic_options,
    subset_to_action,
    synthetic_from_options,
)
from dsom.errors import ConfigError

SMALL = dict(num_entities=400, num_relations=6, num_train=4000, num_valid=300, num_test=300)


@pytest.fixture(scope="module")
def ds():
    return generate_synthetic()


@pytest.fixture(scope="module")
def truth(ds) -> SyntheticTruth:
    return ds.extras["synthetic"]


def _all_triples(d):
    return np.concatenate([d.splits[s] for s in SPLITS], axis=0)


# ------------------------------------------------------------------------------------------------ shape and sanity


def test_default_dataset_shape(ds, truth):
    assert ds.name == "synthetic" and ds.layout == "synthetic" and ds.root is None
    assert ds.summary() == {"name": "synthetic", "entities": 3000, "relations": 24,
                            "train": 40000, "valid": 2000, "test": 2000}
    assert ds.entities.labels[0] == "e0000" and ds.entities.labels[-1] == "e2999"
    assert ds.entities.name(17) == "entity 17" and ds.entities.descriptions[17]
    assert ds.relations.labels[:2] == ["r00", "r01"] and len(set(ds.relations.names)) == 24
    assert list(ds.modalities) == ["text", "numeric", "image"]
    assert truth.teachers == ("structure", "text", "numeric", "image")
    assert truth.latent.shape == (3000, 4, 2 * SYNTHETIC_DEFAULTS["block_rank"])
    assert truth.relation_blocks.shape == (24, 4) and truth.relation_blocks.any(axis=1).all()
    assert truth.relation_blocks.any(axis=0).all()          # every block is used by some relation
    for name, table in ds.modalities.items():
        assert isinstance(table, ModalityTable) and table.name == name
        assert table.features.shape[0] == 3000 and table.features.dtype == np.float32
        assert table.present.shape == (3000,)


def test_ids_in_range_unique_no_self_loops(ds):
    for s in SPLITS:
        x = ds.splits[s]
        assert x.dtype == np.int64 and x.ndim == 2 and x.shape[1] == 3
        assert x[:, [0, 2]].min() >= 0 and x[:, [0, 2]].max() < ds.num_entities
        assert x[:, 1].min() >= 0 and x[:, 1].max() < ds.num_relations
    allt = _all_triples(ds)
    assert len(np.unique(allt, axis=0)) == len(allt)           # no duplicates within or across splits
    assert (allt[:, 0] != allt[:, 2]).all()
    assert set(np.unique(ds.train[:, 1])) == set(range(ds.num_relations))
    degree = np.bincount(allt[:, 0], minlength=ds.num_entities) + np.bincount(allt[:, 2], minlength=ds.num_entities)
    assert degree.min() >= 1                                      # no isolated entity
    assert degree.max() > 20 * np.median(degree)                  # heavy-tailed degrees


def test_determinism_and_seed():
    a, b = generate_synthetic(**SMALL, seed=3), generate_synthetic(**SMALL, seed=3)
    c = generate_synthetic(**SMALL, seed=4)
    for s in SPLITS:
        np.testing.assert_array_equal(a.splits[s], b.splits[s])
    for m in a.modalities:
        np.testing.assert_array_equal(a.modalities[m].features, b.modalities[m].features)
        np.testing.assert_array_equal(a.modalities[m].present, b.modalities[m].present)
    ta, tb = a.extras["synthetic"], b.extras["synthetic"]
    np.testing.assert_array_equal(ta.latent, tb.latent)
    for s in SPLITS:
        np.testing.assert_array_equal(ta.labels[s], tb.labels[s])
    assert not np.array_equal(a.train, c.train)
    assert not np.array_equal(a.modalities["text"].features, c.modalities["text"].features)
    assert a.entities.labels == c.entities.labels              # vocabulary does not depend on the seed


def test_masks_and_corruption(ds, truth):
    E = ds.num_entities
    for m, table in ds.modalities.items():
        corrupted, missing = truth.corrupted[m], truth.missing[m]
        np.testing.assert_array_equal(table.present, ~missing)
        assert not (corrupted & missing).any()
        assert corrupted.sum() == round(SYNTHETIC_DEFAULTS["corrupt_frac"] * E)
        assert missing.sum() == round(SYNTHETIC_DEFAULTS["missing_frac"] * E)
        clean = ~corrupted & ~missing
        np.testing.assert_array_equal(table.features[clean], truth.clean_features[m][clean])
        src = truth.corruption_source[m]
        assert (src[~corrupted] == -1).all()
        idx = np.flatnonzero(corrupted)
        assert (src[idx] != idx).all() and (src[idx] >= 0).all()
        np.testing.assert_array_equal(table.features[idx], truth.clean_features[m][src[idx]])
        assert not np.allclose(table.features[missing], truth.clean_features[m][missing])
        # clean rows are standardised, so imputed N(0, 1) rows do not stand out by scale
        assert abs(float(table.features[clean].std()) - 1.0) < 0.1


def test_unseen_entities(ds, truth):
    E = ds.num_entities
    assert truth.unseen.sum() == round(SYNTHETIC_DEFAULTS["unseen_frac"] * E)
    train_degree = np.bincount(ds.train[:, 0], minlength=E) + np.bincount(ds.train[:, 2], minlength=E)
    np.testing.assert_array_equal(truth.train_degree, train_degree)
    evald = np.concatenate([ds.valid, ds.test])
    in_eval = np.zeros(E, bool)
    in_eval[evald[:, 0]] = in_eval[evald[:, 2]] = True
    np.testing.assert_array_equal(truth.unseen, in_eval & (train_degree == 0))
    touches = truth.unseen[evald[:, 0]] | truth.unseen[evald[:, 2]]
    assert 0 < touches.sum() <= 3 * truth.unseen.sum()          # held-out entities are rare (degree 1-3)


# ------------------------------------------------------------------------------------------------ ground truth


def test_ground_truth_rows_and_api(ds, truth):
    T = len(truth.teachers)
    for s in SPLITS:
        n = len(ds.splits[s])
        lab = truth.labels_for(s)
        assert lab.shape == (n, T) and lab.dtype == np.int8
        assert set(np.unique(lab)) <= {MISLEADING, UNINFORMATIVE, HELPFUL}
        for d in ("tail", "head"):
            assert truth.helpful_subset(s, d).shape == (n, T)
            assert truth.misleading_subset(s, d).shape == (n, T)
        both = truth.labels_for(s, "both")
        assert both.shape == (2 * n, T)
        np.testing.assert_array_equal(both, np.concatenate([truth.labels_for(s, "tail"), truth.labels_for(s, "head")]))
        # labels of arbitrary (also reciprocal) rows agree with the stored ones
        np.testing.assert_array_equal(truth.label_triples(ds.queries(s)), both)
        np.testing.assert_array_equal(truth.helpful_subset(s), lab == HELPFUL)
        np.testing.assert_array_equal(truth.misleading_subset(s), lab == MISLEADING)
        action = truth.target_action(s)
        assert action.shape == (n,) and action.min() >= -1 and action.max() < 2 ** T - 1
        bits = ((action[:, None] + 1) >> np.arange(T)) & 1
        np.testing.assert_array_equal(bits.astype(bool), truth.helpful_subset(s))
    np.testing.assert_array_equal(subset_to_action(np.array([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], bool)),
                                  [0, 5, 6, -1])
    with pytest.raises(KeyError):
        truth.labels_for("nope")
    with pytest.raises(ValueError):
        truth.labels_for("test", "sideways")


def test_label_definition(ds, truth):
    """Recompute the documented definition independently from the recorded masks."""
    for s in SPLITS:
        x = ds.splits[s]
        h, r, t = x[:, 0], x[:, 1], x[:, 2]
        lab = truth.labels[s]
        own = 1 if s == "train" else 0
        support = np.minimum(truth.train_degree[h], truth.train_degree[t]) - own
        np.testing.assert_array_equal(lab[:, 0] == HELPFUL, support >= truth.min_degree)
        assert (lab[:, 0] != MISLEADING).all()
        for i, m in enumerate(truth.modalities, start=1):
            dep = truth.relation_blocks[r, i]
            bad = truth.corrupted[m][h] | truth.corrupted[m][t]
            gone = truth.missing[m][h] | truth.missing[m][t]
            np.testing.assert_array_equal(lab[:, i] == MISLEADING, dep & bad)
            np.testing.assert_array_equal(lab[:, i] == HELPFUL, dep & ~bad & ~gone)
    unseen_rows = truth.unseen[ds.test[:, 0]] | truth.unseen[ds.test[:, 2]]
    assert (truth.labels["test"][unseen_rows, 0] == UNINFORMATIVE).all()


def test_label_mix_is_rich(truth):
    lab = np.concatenate([truth.labels["valid"], truth.labels["test"]])
    frac = {v: (lab == v).mean(axis=0) for v in (HELPFUL, UNINFORMATIVE, MISLEADING)}
    assert 0.05 < frac[UNINFORMATIVE][0] < 0.4                    # structure lacks support on a real minority
    for i in range(1, lab.shape[1]):
        assert frac[HELPFUL][i] > 0.15 and frac[MISLEADING][i] > 0.05 and frac[UNINFORMATIVE][i] > 0.3
    actions = np.bincount(truth.target_action("train") + 1, minlength=2 ** lab.shape[1])
    assert (actions[1:] > 0).sum() >= 8                          # many different helpful subsets occur


# ------------------------------------------------------------------------------------------------ planted signal


def _percentile_ranks(scores: np.ndarray, heads: np.ndarray, tails: np.ndarray) -> np.ndarray:
    scores = scores.copy()
    scores[np.arange(len(heads)), heads] = -np.inf
    true = scores[np.arange(len(tails)), tails]
    return (scores > true[:, None]).mean(axis=1)


@pytest.fixture
def one_torch_thread():
    """Small torch ops run much faster single-threaded on a busy 2-core machine (no OpenMP spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_modality_features_carry_planted_signal(ds, truth, one_torch_thread):
    """Per relation, a linear map from head features to tail features, fitted on clean train triples, ranks the
    true tail of held-out triples far better than chance exactly where the label says the modality is helpful, and
    at chance where it is uninformative (relation does not use the block, or features missing) or misleading."""
    held = np.concatenate([ds.valid, ds.test])
    labels = np.concatenate([truth.labels["valid"], truth.labels["test"]])
    for i, m in enumerate(truth.modalities, start=1):
        # torch for the linear algebra: many small multi-threaded numpy BLAS calls crawl on a busy 2-core machine
        X = torch.from_numpy(ds.modalities[m].features.astype(np.float64))
        eye = 1e-3 * torch.eye(X.shape[1], dtype=X.dtype)
        clean = ~truth.corrupted[m] & ~truth.missing[m]
        pct = {"helpful": [], "misleading": [], "missing": [], "unused": []}
        confident_wrong = []
        for r in range(ds.num_relations):
            tri = ds.train[ds.train[:, 1] == r]
            tri = tri[clean[tri[:, 0]] & clean[tri[:, 2]]]
            H, T = X[torch.from_numpy(tri[:, 0])], X[torch.from_numpy(tri[:, 2])]
            A = torch.linalg.solve(H.T @ H + eye, H.T @ T)           # least squares: head -> tail features
            sel = held[:, 1] == r
            q, lab = held[sel], labels[sel, i]
            scores = (X[torch.from_numpy(q[:, 0])] @ A @ X.T).numpy()
            p = _percentile_ranks(scores, q[:, 0], q[:, 2])
            if not truth.relation_blocks[r, i]:
                pct["unused"].append(p)
                continue
            pct["helpful"].append(p[lab == HELPFUL])
            pct["misleading"].append(p[lab == MISLEADING])
            pct["missing"].append(p[lab == UNINFORMATIVE])
            # corrupted heads point the predictor at the partners of the entity whose features they carry
            bad = np.flatnonzero(truth.corrupted[m][q[:, 0]])
            if len(bad):
                src = truth.corruption_source[m][q[bad, 0]]
                best_of_src = np.argmax(truth.scores(r, src) + np.where(np.arange(ds.num_entities) == src[:, None],
                                                                        -np.inf, 0.0), axis=1)
                confident_wrong.append(_percentile_ranks(scores[bad], q[bad, 0], best_of_src))
        mean = {k: float(np.concatenate(v).mean()) for k, v in pct.items()}
        n = {k: len(np.concatenate(v)) for k, v in pct.items()}
        assert min(n.values()) > 100, (m, n)
        assert mean["helpful"] < 0.25, (m, mean)
        for k in ("misleading", "missing"):
            assert 0.4 < mean[k] < 0.6, (m, k, mean)
        assert 0.45 < mean["unused"] < 0.55, (m, mean)
        assert float(np.concatenate(confident_wrong).mean()) < 0.3, m


def _mutual_information(a: np.ndarray, b: np.ndarray, k: int) -> float:
    joint = np.bincount(a * k + b, minlength=k * k).reshape(k, k) / len(a)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def test_graph_carries_planted_blocks(ds, truth):
    """The sampled graph follows the generating scores, block by block: in train, the head's cluster in block b
    predicts the tail's cluster in block b only for relations that depend on b (including the structural block,
    which no modality reveals), and the observed tails rank high under the exact generating scores."""
    k = truth.params["num_clusters"]
    dep_mi, indep_mi = [], []
    for r in range(ds.num_relations):
        tri = ds.train[ds.train[:, 1] == r]
        for b in range(len(truth.blocks)):
            mi = _mutual_information(truth.clusters[tri[:, 0], b], truth.clusters[tri[:, 2], b], k)
            (dep_mi if truth.relation_blocks[r, b] else indep_mi).append(mi)
    # independent blocks: only the finite-sample bias (about (k-1)^2 / 2n ~ 0.05 nats); dependent: real information
    assert max(indep_mi) < 0.12, max(indep_mi)
    assert min(dep_mi) > 0.25 and min(dep_mi) > 3 * max(indep_mi), (min(dep_mi), max(indep_mi))
    structural = [r for r in range(ds.num_relations) if truth.relation_blocks[r].tolist() == [True] + [False] * 3]
    assert structural, "some relations depend on the structural block only"
    # conditional tail entropy: far below the uniform log E for every relation
    logpop = truth.params["popularity"] * np.log(truth.activity)
    sample = ds.test[:400]
    p = np.concatenate([
        _percentile_ranks(truth.params["sharpness"] * truth.scores(r, sample[sample[:, 1] == r, 0]) + logpop,
                          sample[sample[:, 1] == r, 0], sample[sample[:, 1] == r, 2])
        for r in range(ds.num_relations) if (sample[:, 1] == r).any()])
    assert p.mean() < 0.05 and np.median(p) < 0.01, (p.mean(), np.median(p))


def test_train_patterns_are_learnable_from_the_graph(ds):
    """Graph-only check: per-relation tail frequencies in train predict held-out tails far better than chance,
    and tail distributions per relation are concentrated (entropy well below log E)."""
    E = ds.num_entities
    ent = []
    pct = []
    for r in range(ds.num_relations):
        tails = ds.train[ds.train[:, 1] == r, 2]
        freq = np.bincount(tails, minlength=E).astype(float)
        p = freq[freq > 0] / freq.sum()
        ent.append(float(-(p * np.log(p)).sum()))
        q = ds.test[ds.test[:, 1] == r]
        pct.append((freq[None, :] > freq[q[:, 2], None]).mean(axis=1))
    assert max(ent) < np.log(E) - 1.0
    assert float(np.concatenate(pct).mean()) < 0.3


def test_sampler_is_sampling_without_replacement_from_softmax():
    rng = np.random.default_rng(0)
    with np.errstate(divide="ignore"):
        logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]], np.float32))
    for counts, gumbel_above in ((np.array([1, 1]), 8), (np.array([3, 2]), 8), (np.array([3, 2]), 0)):
        reps = 4000
        big = np.repeat(logits, reps, axis=0)
        c = np.repeat(counts, reps)
        rows, cols = _sample_tails(big.copy(), c, rng, gumbel_above=gumbel_above)
        assert len(rows) == c.sum()
        pairs = rows * 10 + cols
        assert len(np.unique(pairs)) == len(pairs)                    # distinct within a row
        assert not (cols[rows < reps] == 4).any()                     # zero-probability column never drawn
        # first draw of each row follows the softmax
        first = np.unique(rows, return_index=True)[1]
        for k in range(2):
            got = np.bincount(cols[first][k * reps:(k + 1) * reps], minlength=5) / reps
            np.testing.assert_allclose(got, np.exp(logits[k]), atol=0.03)
    # a dominant column makes the i.i.d. draws find too few distinct columns: the exact continuation kicks in
    with np.errstate(divide="ignore"):
        peaked = np.log(np.array([[0.99, 0.004, 0.003, 0.002, 0.001] + [0.0] * 5], np.float32))
    rows, cols = _sample_tails(np.repeat(peaked, 3000, axis=0), np.full(3000, 5), rng)
    c5 = cols.reshape(-1, 5)
    assert (np.sort(c5, axis=1) == np.arange(5)).all()                # exactly the five possible columns
    assert abs(float((c5[:, 0] == 0).mean()) - 0.99) < 0.01
    second = c5[c5[:, 0] == 0, 1]
    assert abs(float((second == 1).mean()) - 0.4) < 0.05              # 0.004 / 0.010
    # second draw given the first: P(second = 1 | first = 0) = 0.3 / 0.5 for row 0
    rows, cols = _sample_tails(np.repeat(logits[:1], 8000, axis=0), np.full(8000, 2), rng)
    c2 = cols.reshape(-1, 2)
    assert abs(float((c2[c2[:, 0] == 0, 1] == 1).mean()) - 0.6) < 0.04


# ------------------------------------------------------------------------------------------------ options


def test_options_and_errors():
    opts = resolve_synthetic_options({"num_entities": "500", "corrupt_frac": {"text": 0.3}, "modalities": "text,image"})
    assert opts["num_entities"] == 500 and opts["modalities"] == ("text", "image")
    assert set(opts) == set(SYNTHETIC_DEFAULTS)
    d = synthetic_from_options({**SMALL, "modalities": ["image"], "corrupt_frac": {"image": 0.25},
                                "feature_dims": 12, "seed": 1})
    tr = d.extras["synthetic"]
    assert tr.teachers == ("structure", "image") and list(d.modalities) == ["image"]
    assert d.modalities["image"].dim == 12 and tr.corrupted["image"].sum() == 100
    assert tr.labels["test"].shape == (300, 2)
    with pytest.raises(ConfigError) as err:
        synthetic_from_options({"num_entites": 100})
    assert "num_entites" in str(err.value) and "num_entities" in str(err.value) and "corrupt_frac" in str(err.value)
    for bad in ({"num_train": "many"}, {"num_train": True}, {"sharpness": -1}, {"corrupt_frac": 0.95},
                {"modalities": ["text", "text"]}, {"modalities": ["structure"]}, {"corrupt_frac": {"audio": 0.1}},
                {"imputation": "magic"}, {"feature_dims": 0}):
        with pytest.raises(ConfigError):
            synthetic_from_options({**SMALL, **bad})
