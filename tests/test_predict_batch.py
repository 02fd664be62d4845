"""`dsom predict --queries`: many queries with one model load, streamed in batches; the answers equal one
`predict` call per query, in TSV or JSON lines, from a file or standard input, written atomically with -o."""

from __future__ import annotations

import io
import json

import pytest

from dsom.cli import main
from dsom.predict import parse_queries, predict, predict_batch
from dsom.train.checkpoint import load_checkpoint

from toy import clustered_graph, write_canonical


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    write_canonical(clustered_graph(num_entities=60), root / "kg")
    out = root / "run"
    assert main(["run", str(root / "kg"), "-o", str(out), "--rank", "8", "--epochs", "3", "-q"]) == 0
    return root, out


QUERIES = "e1\tr0\n# a comment\n\ne2\tr1\t?\n?\tr2\te5\n#7\tr0\n"


def test_batch_answers_equal_single_queries(trained):
    root, out = trained
    ck = load_checkpoint(out)
    from dsom.runs.setup import build_config, load_dataset

    ds = load_dataset(build_config(str(root / "kg")))
    qs = list(parse_queries(io.StringIO(QUERIES), ck.entities, ck.relations))
    assert [(q.line, q.entity, q.relation) for q in qs] == [
        (1, ck.entities.index["e1"], 0), (4, ck.entities.index["e2"], 1),
        (5, ck.entities.index["e5"], 2 + len(ck.relations)), (6, 7, 0)]
    for filt in (True, False):
        batch = predict_batch(ck.model, ck.entities, qs, k=7, filter_index=ds.filter_index, filter_known=filt)
        singles = [predict(ck.model, ck.entities, ck.relations, "r0", head="e1", k=7, filter_index=ds.filter_index,
                           filter_known=filt),
                   predict(ck.model, ck.entities, ck.relations, "r1", head="e2", k=7, filter_index=ds.filter_index,
                           filter_known=filt),
                   predict(ck.model, ck.entities, ck.relations, "r2", tail="e5", k=7, filter_index=ds.filter_index,
                           filter_known=filt),
                   predict(ck.model, ck.entities, ck.relations, "r0", head="#7", k=7, filter_index=ds.filter_index,
                           filter_known=filt)]
        for b, s in zip(batch, singles):
            assert [(a.id, a.known) for a in b] == [(a.id, a.known) for a in s]
            assert [a.score for a in b] == pytest.approx([a.score for a in s], rel=1e-5)
        if filt:
            assert not any(a.known for b in batch for a in b)


def test_queries_file_stdin_formats_and_atomic_output(trained, tmp_path, capsys, monkeypatch):
    _, out = trained
    qfile = tmp_path / "q.tsv"
    qfile.write_text(QUERIES)
    assert main(["predict", str(out), "--queries", str(qfile), "-k", "3"]) == 0
    rows = [x.split("\t") for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 * 3 and [r[0] for r in rows[::3]] == ["1", "4", "5", "6"]
    assert [r[2] for r in rows[:3]] == ["1", "2", "3"]
    monkeypatch.setattr("sys.stdin", io.StringIO(QUERIES))
    res = tmp_path / "answers.jsonl"
    assert main(["predict", str(out), "--queries", "-", "--format", "jsonl", "-k", "2", "--batch-size", "1",
                 "-o", str(res)]) == 0
    lines = [json.loads(x) for x in res.read_text().splitlines()]
    assert [x["line"] for x in lines] == [1, 4, 5, 6] and all(len(x["answers"]) == 2 for x in lines)
    assert lines[0]["answers"][0]["label"] == rows[0][3]  # the same first answer in both formats
    # a bad line: exit 2 naming the file and line; the earlier output file is left as it was
    before = res.read_bytes()
    qfile.write_text("e1\tr0\ne1\tnope\n")
    capsys.readouterr()
    assert main(["predict", str(out), "--queries", str(qfile), "-o", str(res), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{qfile}:2: unknown relation 'nope'" in err and len(err.strip().splitlines()) == 1
    assert res.read_bytes() == before and not list(tmp_path.glob(".answers.jsonl.*"))
    qfile.write_text("?\tr0\t?\n")
    assert main(["predict", str(out), "--queries", str(qfile)]) == 2
    assert "exactly one '?'" in capsys.readouterr().err
    assert main(["predict", str(out), "--queries", str(qfile), "--relation", "r0"]) == 2
    assert main(["predict", str(out)]) == 2
    assert "--queries FILE" in capsys.readouterr().err

