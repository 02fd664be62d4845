"""Exit codes of the CLI beyond 0 and 2 (DESIGN: 2 bad input, 1 internal bug, 130 interrupted), a real Ctrl-C
during training that the run then resumes from, and resume mistakes (no -o, another dataset)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dsom.runs.pipeline
from dsom.cli import main

from toy import clustered_graph, write_canonical

FAST = ["--rank", "8", "--epochs", "2", "--batch-size", "256", "-q"]


def test_an_internal_error_exits_1_with_one_line_and_a_traceback_only_with_debug(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(dsom.runs.pipeline, "run", broken)
    assert main(["run", "-o", str(tmp_path / "r"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "dsom: internal error: RuntimeError: boom (rerun with --debug for a traceback)"
    assert main(["--debug", "run", "-o", str(tmp_path / "r"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err


def test_keyboard_interrupt_exits_130_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsom.runs.pipeline, "run", interrupted)
    assert main(["run", "-o", str(tmp_path / "r"), "-q"]) == 130
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--rank", "8", "--epochs", "40", "--set", "data.synthetic.num_train=3000", "--set",
            "data.synthetic.num_entities=300", "--set", "train.threads=1", "--set", "distill.epochs=1",
            "--set", "distill.variants=[]", "--set", "ensemble.mi_epochs=1", "-q"]
    # a shell's background job (`pytest ... &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "-m", "dsom", "run", "-o", str(out), *args], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum('"epoch": ' in x and '"step"' not in x for x in log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    assert not (out / "results.json").exists()
    assert main(["run", "-o", str(out), "--resume", "--set", "train.epochs=3", "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["selection"]["epochs_run"] == 3


def test_resume_without_output_or_against_another_dataset_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_canonical(clustered_graph(num_entities=40), a)
    write_canonical(clustered_graph(num_entities=50), b)
    assert main(["run", "--resume", "-q"]) == 2
    assert "--resume needs -o" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(a), "-o", str(out), *FAST]) == 0
    (out / "results.json").unlink()  # as if it had died before the end
    before = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["run", str(b), "-o", str(out), "--resume", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"started on dataset '{a}', not '{b}'" in err, err
    assert (out / "config.yaml").read_bytes() == before
    for extra in (["--preset", "paper"], ["-c", str(tmp_path / "other.yaml")]):
        assert main(["run", "-o", str(out), "--resume", "-q", *extra]) == 2
        assert "start a new run with another -o" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == before
    assert main(["run", str(a), "-o", str(out), "--resume", "--preset", "dsom", "-q"]) == 0  # the same: accepted
    (out / "results.json").unlink()
    assert main(["run", "-o", str(out), "--resume", "-q"]) == 0


def test_a_checkpoint_used_with_another_vocabulary_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_canonical(clustered_graph(num_entities=40), a)
    write_canonical(clustered_graph(num_entities=41), b)  # one entity more: another vocabulary
    out = tmp_path / "run"
    assert main(["pretrain", str(a), "-o", str(out), *FAST]) == 0
    capsys.readouterr()
    for argv in (["evaluate", str(out), "--dataset", str(b)],
                 ["predict", str(out), "--dataset", str(b), "--head", "e2", "--relation", "r0"],
                 ["distill", str(b), "--teachers", str(out), "-o", str(tmp_path / "d"), "-q"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "trained on a different vocabulary than dataset '" in err and len(err.splitlines()) == 1, err


def test_features_options_are_range_checked_with_their_own_names(tmp_path, capsys):
    d = tmp_path / "kg"
    write_canonical(clustered_graph(num_entities=30), d)
    assert main(["features", str(d), "--numeric", "--text-batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--text-batch-size must be >= 1, got 0; set it with --text-batch-size VALUE" in err, err
    assert main(["features", str(d), "--numeric", "--seed", "-3"]) == 2
    assert "--seed" in capsys.readouterr().err


def test_disk_full_while_checkpointing_is_exit_2_and_the_run_resumes_to_the_same_result(tmp_path, monkeypatch,
                                                                                          capsys):
    import errno

    import dsom.train.checkpoint as ckpt

    d = tmp_path / "kg"
    write_canonical(clustered_graph(num_entities=40), d)
    args = ["--rank", "4", "--epochs", "3", "--batch-size", "64", "--set", "distill.epochs=2", "-q"]
    ref = tmp_path / "ref"
    assert main(["run", str(d), "-o", str(ref), *args]) == 0
    real, calls = ckpt.save_file, {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint write of the run (inside stage 1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(d), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and len(err.splitlines()) == 1
    assert not (out / "results.json").exists() and not list(out.rglob("*.tmp/model.safetensors"))
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    assert main(["run", "-o", str(out), "--resume", "-q"]) == 0
    got = json.loads((out / "results.json").read_text())["models"]
    want = json.loads((ref / "results.json").read_text())["models"]
    assert {k: v["test"] for k, v in got.items()} == {k: v["test"] for k, v in want.items()}


def test_run_lock_without_fcntl_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    import subprocess as sp

    import dsom.runlock as runlock
    from dsom.errors import DsomError

    monkeypatch.setattr(runlock, "fcntl", None)  # the exclusive-create fallback (Windows)
    first = runlock.RunLock(tmp_path / "r").acquire()
    assert (tmp_path / "r" / runlock.LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(DsomError, match=f"pid {os.getpid()}"):
        runlock.RunLock(tmp_path / "r").acquire()
    first.release()
    assert not (tmp_path / "r" / runlock.LOCK_NAME).exists()
    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r" / runlock.LOCK_NAME).write_text(f"{dead.pid}\n")  # left by a process that has exited
    again = runlock.RunLock(tmp_path / "r").acquire()
    assert (tmp_path / "r" / runlock.LOCK_NAME).read_text().strip() == str(os.getpid())
    again.release()
