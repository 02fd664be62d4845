"""PyKEEN interchange against the real library: a dsom model exported to PyKEEN scores every triple, in both
directions, as dsom does; a PyKEEN-trained ComplEx imported as a structural teacher scores as PyKEEN does and
distils through `dsom distill`."""

from __future__ import annotations

import json

import pytest
import torch

from dsom.cli import main
from dsom.interop import deinterleave, from_pykeen, interleave, load_pykeen
from dsom.train.checkpoint import load_checkpoint

from toy import clustered_graph, write_canonical

pykeen = pytest.importorskip("pykeen", reason="install the [pykeen] extra")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    write_canonical(clustered_graph(num_entities=50), root / "kg")
    out = root / "run"
    assert main(["run", str(root / "kg"), "-o", str(out), "--rank", "6", "--epochs", "2", "--modalities",
                 "structure,text", "--set", "distill.epochs=1", "-q"]) == 0
    return root, out


def test_interleave_round_trip():
    x = torch.randn(4, 10)
    y = interleave(x)
    assert torch.equal(y[:, 0::2], x[:, :5]) and torch.equal(y[:, 1::2], x[:, 5:])
    assert torch.equal(deinterleave(y), x)


def test_exported_student_and_teacher_score_like_dsom_in_both_directions(run, tmp_path):
    root, out = run
    for extra, source in (([], "student"), (["--teacher", "text"], "teacher/text")):
        dest = tmp_path / source.replace("/", "_")
        assert main(["export", str(out), "-o", str(dest), *extra]) == 0
        assert json.loads((dest / "dsom_export.json").read_text())["model"] == source
        pk, tf = load_pykeen(dest)
        assert isinstance(pk, pykeen.models.ComplEx) and tf.create_inverse_triples
        ck = load_checkpoint(out if source == "student" else out / "checkpoints" / "teachers" / "final")
        ours = ck.model if source == "student" else ck.teachers.view(["text"])
        E, R = len(ck.entities), len(ck.relations)
        h, r = torch.arange(E).repeat_interleave(R), torch.arange(R).repeat(E)
        mine_t = ours.score_all(h, r)  # (h, r, ?) for every head and relation
        mine_h = ours.score_all(h, r + R)  # (?, r, h): heads through the reciprocal relation
        pk.eval()
        with torch.no_grad():
            theirs_t = pk.predict_t(torch.stack([h, r], 1))
            theirs_h = pk.predict_h(torch.stack([r, h], 1))
        torch.testing.assert_close(theirs_t, mine_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs_h, mine_h, rtol=1e-4, atol=1e-5)
        # the label mappings travel with the model
        assert tf.entity_to_id[ck.entities.labels[7]] == 7 and tf.num_relations == 2 * R


def test_a_pykeen_trained_complex_becomes_a_structural_teacher(run, tmp_path):
    root, _ = run
    from pykeen.pipeline import pipeline
    from pykeen.triples import TriplesFactory

    labels = [line.split("\t") for line in (root / "kg" / "train.tsv").read_text().splitlines()]
    import numpy as np

    tf = TriplesFactory.from_labeled_triples(np.array(labels, dtype=str), create_inverse_triples=False)
    result = pipeline(training=tf, testing=tf, model="ComplEx", model_kwargs={"embedding_dim": 6},
                      training_kwargs={"num_epochs": 2, "use_tqdm": False}, random_seed=0,
                      evaluation_kwargs={"use_tqdm": False})
    folder = tmp_path / "pk"
    result.save_to_directory(folder)
    assert main(["import-pykeen", str(folder), str(root / "kg"), "-o", str(tmp_path / "imported")]) == 0
    ck = load_checkpoint(tmp_path / "imported" / "checkpoints" / "teachers" / "final")
    teacher = ck.teachers.view(["structure"])
    pk, _ = load_pykeen(folder)
    pk.eval()
    for label_h, label_r in (("e3", "r1"), ("e10", "r0")):
        h, r = tf.entity_to_id[label_h], tf.relation_to_id[label_r]
        with torch.no_grad():
            theirs = pk.predict_t(torch.tensor([[h, r]]))[0]
            theirs_h = pk.predict_h(torch.tensor([[r, h]]))[0]
        ours = teacher.score_all(torch.tensor([ck.entities.index[label_h]]),
                                 torch.tensor([ck.relations.index[label_r]]))[0]
        ours_h = teacher.score_all(torch.tensor([ck.entities.index[label_h]]),
                                   torch.tensor([ck.relations.index[label_r] + len(ck.relations)]))[0]
        order = torch.tensor([tf.entity_to_id[x] for x in ck.entities.labels])  # dataset ids -> PyKEEN ids
        torch.testing.assert_close(ours, theirs[order], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_h, theirs_h[order], rtol=1e-4, atol=1e-5)
    assert from_pykeen(pk).num_relations == 2 * tf.num_relations
    out = tmp_path / "student"
    assert main(["distill", str(root / "kg"), "--teachers", str(tmp_path / "imported"), "-o", str(out), "--rank", "6",
                 "--epochs", "1", "-q"]) == 0
    assert "student" in json.loads((out / "results.json").read_text())["models"]
