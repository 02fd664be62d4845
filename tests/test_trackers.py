"""Experiment trackers for real (no mocks): a tiny `dsom run --tracker mlflow,tensorboard`, read back through
MLflow's client and TensorBoard's event reader, must hold exactly what metrics.jsonl and results.json say."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from dsom.cli import main
from dsom.config import Config
from dsom.errors import DsomError

needs_track = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("tensorboard") is None,
    reason="the track extra is not installed: pip install 'dsom[track]' (make setup installs it)")
TINY = ["--rank", "4", "--epochs", "2", "--batch-size", "512", "--set", "data.synthetic.num_entities=200",
        "--set", "data.synthetic.num_train=1500", "--set", "data.synthetic.num_valid=100",
        "--set", "data.synthetic.num_test=100", "--set", "ensemble.mi_epochs=1", "--set", "distill.epochs=2",
        "--set", "distill.variants=[]", "--set", "train.valid_every=1", "--set", "train.threads=1", "-q"]
SELF = ("event", "stage", "epoch", "step")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating MLflow's schema takes seconds; a run's default is its own)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def expected_series(run_dir: Path) -> tuple[dict[str, list], dict[str, list]]:
    """metrics.jsonl as ``{stage/key: [(step, value)]}``: epoch records at their epoch, per-batch records at the
    global batch ``(epoch - 1) * batches + step``; the second dict is the per-batch part."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs: dict[str, list] = {}
    batches: dict[str, list] = {}
    per_epoch: dict[tuple, int] = {}
    for r in records:
        if "step" in r and "event" not in r:
            per_epoch[r["stage"], r["epoch"]] = max(per_epoch.get((r["stage"], r["epoch"]), 0), r["step"] + 1)
    for r in records:
        if "event" in r:
            continue
        stage = r["stage"].replace(":", "/")
        for k, v in leaves({k: v for k, v in r.items() if k not in SELF}).items():
            if "step" in r:
                batches.setdefault(f"{stage}/{k}", []).append(
                    ((r["epoch"] - 1) * per_epoch[r["stage"], r["epoch"]] + r["step"], v))
            else:
                epochs.setdefault(f"{stage}/{k}", []).append((r["epoch"], v))
    return epochs, batches


def mlflow_name(name: str) -> str:
    return re.sub(r"[^/\w.\- ]", "_", name)  # MLflow refuses '@' (hits@10)


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(state["uri"])
    return client, client.get_run(state["run_id"])


def scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_track
def test_mlflow_and_tensorboard_hold_what_metrics_jsonl_and_results_json_say(tmp_path, store):
    out = tmp_path / "run"
    assert main(["run", "-o", str(out), *TINY, "--tracker", "mlflow,tensorboard",
                 "--set", f"track.mlflow_uri={store}"]) == 0
    epochs, batches = expected_series(out)
    results = json.loads((out / "results.json").read_text())
    assert "pretrain/loss/ce" in epochs and "distill/valid/realistic/mrr" in epochs and "distill/reward" in batches

    # MLflow: the expanded config as parameters, every series with its steps, the results, the files
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.rank"] == "4"
    assert run.data.params["track.trackers"] == json.dumps(config["track"]["trackers"])
    assert run.data.params["data.synthetic.num_entities"] == "200"
    params = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event": "params"' in x]
    for p in params:  # each stage's own parameters under <stage>.<key>
        assert {k: run.data.params[f"{p['stage']}.{k}"] for k in p if k not in SELF} == \
            {k: str(v) for k, v in p.items() if k not in SELF}
    logged = {k for k in run.data.metrics if not k.startswith("results/")}
    assert logged == {mlflow_name(k) for k in (*epochs, *batches)}
    for name, series in {**epochs, **batches}.items():
        history = client.get_metric_history(run.info.run_id, mlflow_name(name))
        assert sorted((m.step, m.value) for m in history) == sorted(series), name
    final = {k[len("results/"):]: v for k, v in run.data.metrics.items() if k.startswith("results/")}
    assert final == {mlflow_name(k): v for k, v in leaves(results).items()}
    assert final["models/student/test/realistic/mrr"] == results["models"]["student"]["test"]["realistic"]["mrr"]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    files |= {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    pngs = {f"report/{p.name}" for p in (out / "report").glob("*.png")}
    assert pngs and {"results.json", "config.yaml", *pngs} <= files
    got = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == results

    # TensorBoard: one run per stage under run_dir/tensorboard (float32 values)
    tb = out / "tensorboard"
    for stage in ("pretrain", "distill"):
        want = {k[len(stage) + 1:]: v for k, v in epochs.items() if k.split("/")[0] == stage
                and not k.startswith("distill/policy/")}
        got = scalars(tb / stage)
        assert set(got) == set(want)
        for tag, series in want.items():
            assert [s for s, _ in got[tag]] == [s for s, _ in series]
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-30)
    got = scalars(tb / "distill" / "batches")
    want = {k[len("distill/"):]: v for k, v in batches.items()}
    assert {t: [s for s, _ in v] for t, v in got.items()} == {t: [s for s, _ in v] for t, v in want.items()}
    got = scalars(tb / "results")
    assert all(len(v) == 1 and v[0][0] == 0 for v in got.values())
    assert {t: v[0][1] for t, v in got.items()} == pytest.approx(leaves(results), rel=1e-6)


@needs_track
def test_resume_continues_the_run_and_distill_is_a_child_run(tmp_path, store):
    teachers, student = tmp_path / "teachers", tmp_path / "student"
    track = ["--tracker", "mlflow,tensorboard", "--set", f"track.mlflow_uri={store}"]
    assert main(["pretrain", "-o", str(teachers), *TINY, *track]) == 0
    _, first = mlflow_run(teachers)
    # pretend it stopped after epoch 2 of 3 and continue it: the same MLflow run, epoch 3 added
    (teachers / "results.json").unlink()
    assert main(["pretrain", "-o", str(teachers), "--resume", "--epochs", "3", "-q"]) == 0
    client, run = mlflow_run(teachers)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed.train.epochs"] == "3" and run.data.params["train.epochs"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss/ce")]
    epochs, _ = expected_series(teachers)
    assert sorted(steps) == [1, 2, 3] == [s for s, _ in epochs["pretrain/loss/ce"]]
    assert [s for s, _ in scalars(teachers / "tensorboard" / "pretrain")["loss/ce"]] == [1, 2, 3]

    # dsom distill writes another run directory: its own MLflow run, under the teachers' run
    assert main(["distill", "--teachers", str(teachers), "-o", str(student), *TINY, *track]) == 0
    _, child = mlflow_run(student)
    assert child.info.run_id != run.info.run_id and child.info.run_name == "student"
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id and child.data.tags["dsom.stages"] == "distill"
    assert "distill/loss/kd" in child.data.metrics or "distill/loss/ce" in child.data.metrics

    # --force starts over: a new MLflow run, the earlier event files gone
    assert main(["pretrain", "-o", str(teachers), *TINY, *track, "--force"]) == 0
    _, again = mlflow_run(teachers)
    assert again.info.run_id != run.info.run_id
    assert [s for s, _ in scalars(teachers / "tensorboard" / "pretrain")["loss/ce"]] == [1, 2]


@pytest.mark.parametrize("tracker,install", [("mlflow", "pip install 'dsom[track]'"),
                                             ("tensorboard", "pip install 'dsom[track]'"),
                                             ("wandb", "pip install wandb")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tracker, install, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: importing it raises ImportError
    assert main(["run", "-o", str(tmp_path / "x"), *TINY, "--tracker", tracker]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and install in err and tracker in err
    assert not (tmp_path / "x").exists()  # refused before anything is written

    from dsom.train.tracker import make_tracker

    cfg = Config()
    cfg.track.trackers = [tracker]
    with pytest.raises(DsomError, match=re.escape(install)):
        make_tracker(tmp_path / "y", cfg, "pretrain")


def test_unknown_tracker_is_refused(tmp_path, capsys):
    assert main(["run", "-o", str(tmp_path / "x"), *TINY, "--tracker", "mlflow,comet"]) == 2
    assert "'comet' is not one of jsonl, mlflow, tensorboard, wandb" in capsys.readouterr().err
