"""`dsom tune` against the real Optuna: trials on valid only, a resumable SQLite study, stale trials failed,
best.yaml that `dsom run -c` accepts, and the best value equal to what the trials logged."""

from __future__ import annotations

import json

import pytest

from dsom.cli import main
from dsom.config import load_yaml
from dsom.runs.setup import build_config

from toy import clustered_graph, write_canonical

optuna = pytest.importorskip("optuna")

ARGS = ["--rank", "6", "--epochs", "2", "--set", "train.valid_every=1", "--set", "distill.epochs=2", "--set",
        "train.selection_metric=mrr", "--set", "train.threads=1", "-q"]


@pytest.mark.slow
def test_tune_runs_resumes_and_writes_the_best_configuration(tmp_path, capsys):
    kg = tmp_path / "kg"
    write_canonical(clustered_graph(num_entities=50), kg)
    space = tmp_path / "space.yaml"
    space.write_text("distill.gamma: {type: float, low: 0.5, high: 4.0, log: true}\n"
                     "distill.kd: {type: categorical, choices: [ndkd, vanilla]}\n")
    out = tmp_path / "tune"
    assert main(["tune", str(kg), "-o", str(out), "--trials", "3", "--space", str(space), *ARGS]) == 0
    assert "best trial" in capsys.readouterr().out
    study = optuna.load_study(study_name="dsom", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 3 and (out / "teachers" / "results.json").exists()
    # the objective is the best validation value each trial logged (never test)
    for t in study.trials:
        if t.state.name == "COMPLETE":
            recs = [json.loads(x) for x in (out / f"trial-{t.number}" / "metrics.jsonl").read_text().splitlines()]
            values = [r["selection_value"] for r in recs if "selection_value" in r]
            assert t.value == pytest.approx(max(values)) and len(t.intermediate_values) == len(values)
            assert not any("test" in r for r in recs)
    best = study.best_trial
    saved = load_yaml(out / "best.yaml")
    assert saved["distill"]["gamma"] == pytest.approx(best.params["distill.gamma"])
    assert saved["distill"]["kd"] == best.params["distill.kd"]
    cfg = build_config(None, str(out / "best.yaml"))  # what `dsom run -c best.yaml` builds
    assert cfg.distill.gamma == pytest.approx(best.params["distill.gamma"]) and cfg.model.rank == 6
    assert len((out / "trials.tsv").read_text().splitlines()) == 1 + 3
    # a trial left running by a killed search is failed, not counted; the search continues to 4 finished trials
    study.ask()
    assert main(["tune", str(kg), "-o", str(out), "--trials", "4", "--space", str(space), *ARGS]) == 0
    study = optuna.load_study(study_name="dsom", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and sum(s in ("COMPLETE", "PRUNED") for s in states) == 4


@pytest.mark.parametrize("text,needle", [
    ("distill.gama: {type: float, low: 1, high: 2}\n", "unknown config key 'distill.gama'"),
    ("distill.gamma: {type: float, low: 2, high: 1}\n", "low < high"),
    ("distill.gamma: {type: float, low: 0, high: 1, log: true}\n", "low > 0"),
    ("distill.kd: {type: categorical, choices: []}\n", "non-empty 'choices'"),
    ("distill.kd: {type: beta}\n", "float|int|categorical"),
])
def test_bad_search_spaces_exit_2_before_anything_runs(tmp_path, capsys, text, needle):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    assert main(["tune", "-o", str(tmp_path / "t"), "--space", str(space), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()
