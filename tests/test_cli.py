"""End-to-end CLI tests on small generated data (exit codes, outputs, contracts of DESIGN §2 and §5)."""

import json

import pytest

from dsom.cli import main

from toy import clustered_graph, write_canonical

FAST = ["--rank", "8", "--epochs", "3", "--batch-size", "256", "--set", "train.valid_every=1", "-q"]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "toykg"
    write_canonical(clustered_graph(num_entities=80), d)
    return d


def test_run_writes_the_run_directory(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(folder), "-o", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["entities"] == 80 and res["modalities"] == ["structure"]
    test = res["models"]["teacher/structure"]["test"]
    assert set(test) == {"realistic", "pessimistic", "optimistic"}
    assert set(test["realistic"]) == {"mrr", "mr", "hits@1", "hits@3", "hits@10"}
    assert 0 < test["realistic"]["mrr"] <= 1
    assert "test_head" in res["models"]["teacher/structure"]
    assert res["timing"]["pretrain_epoch_s"] > 0 and res["versions"]["torch"]
    # the batching each stage used, train.batching / distill.batching resolved (auto: pairs on this CPU)
    from dsom.config import Config

    default = {"auto": "pairs"}.get(Config().train.batching, Config().train.batching)
    assert res["batching"] == {"teachers": default}
    assert res["distill"]["students"]["student"]["batching"] == {"auto": "pairs"}.get(Config().distill.batching,
                                                                                    Config().distill.batching)
    cfg = (out / "config.yaml").read_text()
    assert "rank: 8" in cfg and "lr: 0.1" in cfg  # fully expanded
    assert (out / "checkpoints" / "teachers" / "best" / "model.safetensors").exists()
    assert (out / "checkpoints" / "teachers" / "final" / "model.safetensors").exists()
    assert "teacher/structure" in capsys.readouterr().out
    # refusing to clobber the finished run
    assert main(["run", str(folder), "-o", str(out), *FAST]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_evaluate_json_and_predict(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(folder), "-o", str(out), *FAST]) == 0
    capsys.readouterr()
    js = tmp_path / "m.json"
    assert main(["evaluate", str(out / "checkpoints" / "teachers" / "final"), "--dataset", str(folder), "--json", str(js), "-q"]) == 0
    m = json.loads(js.read_text())
    assert set(m) >= {"realistic", "pessimistic", "optimistic", "head", "tail"}
    res = json.loads((out / "results.json").read_text())
    assert m["realistic"] == res["models"]["teacher/structure"]["test"]["realistic"]
    # the checkpoint remembers its dataset path
    assert main(["evaluate", str(out), "--split", "valid", "-q"]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--head", "e0", "--relation", "r1", "-k", "5", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 5 and [a["rank"] for a in answers] == [1, 2, 3, 4, 5]
    assert all(not a["known"] for a in answers)
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True)
    assert main(["predict", str(out), "--tail", "e3", "--relation", "r0", "-k", "3"]) == 0
    assert main(["predict", str(out), "--head", "e00", "--relation", "r1"]) == 2
    err = capsys.readouterr().err
    assert "unknown entity 'e00'" in err and "close matches" in err


def test_resume_continues_an_interrupted_run(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(folder), "-o", str(out), *FAST]) == 0
    ref = json.loads((out / "results.json").read_text())
    # Pretend the run died after epoch 3 of 5: extend the budget and resume.
    (out / "results.json").unlink()
    assert main(["run", "-o", str(out), "--resume", "--epochs", "5", "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["selection"]["epochs_run"] == 5
    assert ref["selection"]["epochs_run"] == 3


@pytest.mark.parametrize("argv,needle", [
    (["run", "no-such-dataset"], "neither a folder nor a registered name"),
    (["run", "--set", "train.lrr=1"], "did you mean train.lr"),
    (["run", "--set", "train.lr=abc"], "expected float"),
    (["run", "--modalities", "structure,smell"], "smell"),
    (["evaluate", "/nonexistent/ckpt"], "no checkpoint"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    assert main([*argv, "-o", str(tmp_path / "x")] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_version_and_config(capsys):
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "python" in out
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: 0.1" in out and "model.rank" in out


def test_data_info_on_a_folder(folder, capsys):
    import re

    assert main(["data", "info", str(folder)]) == 0
    out = capsys.readouterr().out
    ds = clustered_graph(num_entities=80)  # the graph the fixture wrote
    assert re.search(r"^\s*entities\s+80$", out, re.M) and re.search(rf"^\s*relations\s+{ds.num_relations}\s", out, re.M)
    for split in ("train", "valid", "test"):
        n = len(ds.queries(split)) // 2  # reciprocal queries: two per triple
        assert re.search(rf"^\s*{split}\s+{n:,}\s+{n:,}\s+0\s+1$", out, re.M), (split, n)


def test_config_doc_is_in_sync():
    from pathlib import Path

    from dsom.config import markdown

    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == markdown(), "regenerate: python -m dsom.config > docs/config.md"


def test_malformed_dataset_exits_2_naming_file_and_line(folder, tmp_path, capsys):
    bad = folder / "valid.tsv"
    lines = bad.read_text().splitlines()
    lines[2] = "e1\tr0"  # wrong column count on line 3
    bad.write_text("\n".join(lines) + "\n")
    assert main(["data", "info", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "valid.tsv:3" in err and len(err.splitlines()) == 1
    assert main(["run", str(folder), "-o", str(tmp_path / "r"), *FAST]) == 2
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.slow
def test_synthetic_options_via_set(tmp_path):
    out = tmp_path / "syn"
    argv = ["run", "-o", str(out), "--set", "data.synthetic.num_entities=300", "--set", "data.synthetic.num_train=3000",
            "--set", "data.synthetic.num_valid=200", "--set", "data.synthetic.num_test=200", *FAST]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["name"] == "synthetic" and res["dataset"]["entities"] == 300
    # the checkpoint regenerates the same synthetic graph for evaluation
    assert main(["evaluate", str(out), "-q"]) == 0


def test_features_numeric_builds_then_reuses_the_cache(tmp_path, capsys, monkeypatch):
    from toy import random_graph

    ds = random_graph(num_entities=20, num_relations=2, num_triples=60, valid=5, test=5)
    folder = tmp_path / "kg"
    write_canonical(ds, folder)
    (folder / "numeric.tsv").write_text("entity\tattribute\tvalue\ne1\theight\t2.0\ne2\theight\t4.0\ne2\tyear\t1990\n")
    monkeypatch.setenv("DSOM_CACHE", str(tmp_path / "cache"))
    assert main(["features", str(folder), "--numeric"]) == 0
    first = capsys.readouterr().out
    assert "20 x 2, present 2/20" in first and "(built)" in first
    assert main(["features", str(folder), "--numeric"]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert list((tmp_path / "cache").rglob("numeric-*.npz"))
    assert main(["features", str(folder)]) == 2
