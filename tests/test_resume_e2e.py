"""The README's promise through the real command: a `dsom run` killed with SIGKILL inside stage 1 or inside stage 2
continues with `dsom run -o RUN --resume` and ends with the same metrics and the same weights as a run that was
never interrupted.

The kill is real (a separate process, SIGKILL, no clean-up of any kind); it is placed at a chosen training step by a
small launcher that wraps :class:`dsom.train.loop.Trainer` in the child process only, so nothing in the package
exists for the test's sake.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from dsom.cli import main

from toy import KILL_LAUNCHER

RUN = ["--rank", "8", "--epochs", "3", "--set", "data.synthetic.num_train=3000", "--set",
       "data.synthetic.num_entities=400", "--set", "ensemble.mi_epochs=1", "--set", "distill.policy_hidden=16",
       "--set", "train.valid_every=1", "--set", "distill.epochs=3", "--set", "distill.variants=[]",
       "--set", "train.threads=1", "-q"]



def _models(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    return {k: {s: v for s, v in m.items() if s not in ("timing",)} for k, m in res["models"].items()}


def _weights(run: Path) -> dict:
    out = {}
    for f in sorted((run / "checkpoints").glob("*/final/model.safetensors")):
        for name, arr in load_file(str(f)).items():
            out[f"{f.parent.parent.name}/{name}"] = arr
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", "-o", str(out), *RUN]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,epoch,batch,torn", [("pretrain", 2, 3, False), ("distill", 2, 1, False),
                                                     ("distill", 3, 0, True)])
def test_a_run_killed_inside_a_stage_resumes_to_the_same_results(reference, tmp_path, stage, epoch, batch, torn):
    """``torn``: the kill also interrupted the checkpoint swap of write_checkpoint (``last`` renamed to
    ``last.old``, a half-written ``last.tmp`` left behind): the resume must fall back to ``last.old``."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_LAUNCHER, stage, str(epoch), str(batch), "run", "-o", str(out), *RUN],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    # where it died: stage 2 never started for a stage-1 kill; stage 1 finished for a stage-2 kill
    assert (out / "checkpoints" / "teachers" / "final").exists() == (stage == "distill")
    if torn:
        last = out / "checkpoints" / "student" / "last"
        last.rename(last.with_name("last.old"))
        tmp = last.with_name("last.tmp")
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"entity\": {")
    assert main(["run", "-o", str(out), "--resume", "-q"]) == 0
    assert _models(out) == _models(reference)
    # it continued from the checkpoint instead of starting over: every epoch record of the log exists once
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in records if "epoch" in r and "step" not in r]
    assert len(epochs) == len(set(epochs)) == 6, epochs
    ref_w, got_w = _weights(reference), _weights(out)
    assert set(got_w) == set(ref_w) and any(k.startswith("student/") for k in got_w)
    for name, arr in ref_w.items():
        assert (got_w[name] == arr).all(), name
