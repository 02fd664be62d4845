"""Bad-input corpus (issue 11): every case exits 2 with one line and no traceback, and an earlier finished run
in the output directory stays byte-for-byte intact.

One finished run is built per module and reused; every case that names it as ``-o`` must leave it unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsom.cli import main

from toy import clustered_graph, write_canonical

FAST = ["--rank", "8", "--epochs", "2", "--batch-size", "256", "--set", "train.valid_every=1", "-q"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kg") / "toykg"
    write_canonical(clustered_graph(num_entities=60), d)
    return d


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", str(data), "-o", str(out), *FAST]) == 0
    assert (out / "results.json").is_file() and (out / "checkpoints").is_dir()
    return out, snapshot(out)


def one_line_exit_2(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("dsom: error:"), err
    return err


def assert_intact(finished) -> None:
    out, before = finished
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ configuration
CONFIG_CASES = [
    ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"), ("train.lr=0", "train.lr"),
    ("distill.student_rank=-5", "distill.student_rank"), ("distill.policy_hidden=0", "distill.policy_hidden"),
    ("eval.splits=[foo]", "eval.splits"), ("eval.splits=[]", "eval.splits"), ("distill.tau=0", "distill.tau"),
    ("train.scheduler_factor=5", "train.scheduler_factor"), ("distill.epochs=-1", "distill.epochs"),
    ("train.valid_max_triples=-5", "train.valid_max_triples"), ("train.valid_every=-1", "train.valid_every"),
    ("ensemble.mi_holdout=1.5", "ensemble.mi_holdout"), ("ensemble.mi_holdout=1", "ensemble.mi_holdout"),
    ("eval.memory_budget_mb=0", "eval.memory_budget_mb"), ("eval.batch_size=0", "eval.batch_size"),
    ("distill.gamma=-1", "distill.gamma"), ("distill.reward_tau=0", "distill.reward_tau"),
    ("distill.holdout=1", "distill.holdout"), ("features.missing_rate=2", "features.missing_rate"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.seed=-3", "train.seed"),
    ("distill.reward_negative=nan", "distill.reward_negative"), ("model.init_scale=0", "model.init_scale"),
    ("train.device=tpu", "train.device"), ("data.dataset=", "data.dataset"),
    ("distill.variants=[nonsense]", "nonsense"), ("distill.selector=oracle9", "distill.selector"),
    ("train.optimizer=lbfgs", "train.optimizer"), ("train.lrr=0.1", "did you mean train.lr"),
    ("train.epochs=1.5", "train.epochs"),
]


@pytest.mark.parametrize("assignment,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value_with_force_keeps_the_run(assignment, needle, data, finished, capsys):
    err = one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", *FAST, "--set", assignment], capsys)
    assert needle in err
    assert_intact(finished)


def test_config_message_says_how_to_fix(data, finished, capsys):
    err = one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", "--set", "distill.tau=0"], capsys)
    assert "--set distill.tau=" in err and "4.0" in err


def test_bad_config_file_keeps_the_run(data, finished, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: .nan\n")
    assert "train.lr" in one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", "-c", str(f)], capsys)
    f.write_text("train: [1, 2\n")
    assert "invalid YAML" in one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", "-c", str(f)],
                                             capsys)
    assert_intact(finished)


# ------------------------------------------------------------------------------------------ datasets
def _bad_dataset(kind: str, good: Path, root: Path) -> str:
    d = root / kind
    if kind == "missing":
        return str(d)
    d.mkdir()
    for f in good.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if kind == "short_line":
        lines = (d / "valid.tsv").read_text().splitlines()
        lines[1] = "e1\tr0"
        (d / "valid.tsv").write_text("\n".join(lines) + "\n")
    elif kind == "unknown_relation":
        with (d / "test.tsv").open("a") as fh:
            fh.write("e1\tr99\te2\n")
    elif kind == "train_is_a_directory":
        (d / "train.tsv").unlink()
        (d / "train.tsv").mkdir()
    elif kind == "no_vocabulary":
        (d / "entities.tsv").unlink()
    elif kind == "binary_garbage":
        (d / "train.tsv").write_bytes(b"\xff\xfe\x00\x81garbage\x00\n" * 10)
    elif kind == "empty_train":
        (d / "train.tsv").write_text("")
    elif kind == "train_is_a_fifo":
        (d / "train.tsv").unlink()
        os.mkfifo(d / "train.tsv")
    elif kind == "train_is_a_symlink_loop":
        (d / "train.tsv").unlink()
        os.symlink(d / "loop.tsv", d / "train.tsv")
        os.symlink(d / "train.tsv", d / "loop.tsv")
    elif kind == "numeric_is_a_directory":
        (d / "numeric.tsv").mkdir()
    elif kind == "numeric_is_a_fifo":
        os.mkfifo(d / "numeric.tsv")
    elif kind == "empty_folder":
        for f in d.iterdir():
            f.unlink()
    else:
        raise AssertionError(kind)
    return str(d)


DATASET_CASES = {"missing": "neither a folder", "short_line": "valid.tsv:2", "unknown_relation": "r99",
                 "train_is_a_directory": "train.tsv (a directory)", "no_vocabulary": "entities.tsv",
                 "binary_garbage": "train.tsv", "empty_train": "train", "empty_folder": "layout",
                 "train_is_a_fifo": "train.tsv (a FIFO", "train_is_a_symlink_loop": "train.tsv (a symlink loop)",
                 "numeric_is_a_directory": "numeric.tsv", "numeric_is_a_fifo": "numeric.tsv"}


@pytest.mark.parametrize("kind", list(DATASET_CASES))
def test_bad_dataset_with_force_keeps_the_run(kind, data, finished, tmp_path, capsys):
    path = _bad_dataset(kind, data, tmp_path)
    modalities = ["--modalities", "structure,numeric"] if kind.startswith("numeric") else []
    err = one_line_exit_2(["run", path, "-o", str(finished[0]), "--force", *FAST, *modalities], capsys)
    assert DATASET_CASES[kind] in err
    assert_intact(finished)


def test_data_info_on_a_fifo_split_does_not_hang(data, tmp_path, capsys):
    path = _bad_dataset("train_is_a_fifo", data, tmp_path)
    assert "FIFO" in one_line_exit_2(["data", "info", path, "--layout", "canonical"], capsys)


def test_empty_dataset_name_is_refused(finished, capsys):
    assert "empty" in one_line_exit_2(["run", "", "-o", str(finished[0]), "--force", *FAST], capsys)
    assert_intact(finished)


def test_finished_run_is_not_clobbered_without_force(data, finished, capsys):
    assert "finished run" in one_line_exit_2(["run", str(data), "-o", str(finished[0]), *FAST], capsys)
    assert_intact(finished)


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("change,needle", [
    (["--rank", "16"], "model.rank"), (["--seed", "7"], "train.seed"), (["--set", "train.lr=0.5"], "train.lr"),
    (["--set", "distill.student_rank=4"], "distill.student_rank"), (["--set", "data.valid=clean"], "data.valid"),
    (["--modalities", "structure,numeric"], "numeric"), (["--set", "train.lr=-1"], "train.lr")],
    ids=["rank", "seed", "lr", "student_rank", "valid", "modalities", "bad_lr"])
def test_resume_with_a_changed_option_is_refused_before_writing(change, needle, finished, capsys):
    err = one_line_exit_2(["run", "-o", str(finished[0]), "--resume", "-q", *change], capsys)
    assert needle in err
    assert_intact(finished)  # config.yaml untouched: a plain --resume still works


def test_resume_of_nothing(tmp_path, capsys):
    assert "nothing to resume" in one_line_exit_2(["run", "-o", str(tmp_path / "none"), "--resume"], capsys)


# ------------------------------------------------------------------------------------------ output paths
def test_output_is_a_file(data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in one_line_exit_2(["run", str(data), "-o", str(f), *FAST], capsys)
    assert f.read_text() == "x"


def test_output_under_dev_null(data, capsys):
    one_line_exit_2(["run", str(data), "-o", "/dev/null/run", *FAST], capsys)


def test_json_into_a_missing_folder_fails_before_the_work(finished, tmp_path, capsys):
    err = one_line_exit_2(["evaluate", str(finished[0]), "-q", "--json", str(tmp_path / "no" / "m.json")], capsys)
    assert "does not exist" in err


# ------------------------------------------------------------------------------------------ lock
def test_second_writer_gets_the_holders_pid(data, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from dsom.runlock import RunLock
        RunLock({str(out)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_exit_2(["run", str(data), "-o", str(out), *FAST], capsys)
        assert f"pid {holder.pid}" in err and "in use" in err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "checkpoints").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from dsom.errors import DsomError
    from dsom.runlock import LOCK_NAME, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid}\n")
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(DsomError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


# ------------------------------------------------------------------------------------------ commands
def test_predict_needs_a_positive_k(finished, capsys):
    assert "-k" in one_line_exit_2(["predict", str(finished[0]), "--head", "e0", "--relation", "r0", "-k", "-5"],
                                   capsys)


def test_data_info_into_a_closed_pipe(data, capsys, monkeypatch):
    r, w = os.pipe()
    os.close(r)
    stream = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["data", "info", str(data)]) == 0
    finally:
        monkeypatch.undo()
        try:
            stream.close()
        except OSError:
            pass
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ side files (images.tsv)
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    pytest.importorskip("transformers", reason="install the [features] extra for image features")
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=8, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


def _image_folder(data: Path, root: Path, rows: list[str]) -> Path:
    d = root / "imgkg"
    d.mkdir()
    for f in data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "img").mkdir()
    (d / "images.tsv").write_text("entity\tpath\n" + "".join(f"{r}\n" for r in rows))
    return d


OUTSIDE = {"dotdot": "e0\t../../../../../../etc/passwd", "absolute": "e0\t/etc/passwd",
           "symlink_out": "e0\timg/link.png", "deep_dotdot": "e1\timg/../../outside.png"}


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_image_paths_outside_the_dataset_are_refused(kind, data, finished, tmp_path, capsys, monkeypatch):
    PIL = pytest.importorskip("PIL.Image")
    PIL.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    d = _image_folder(data, tmp_path, ["e2\timg/ok.png", OUTSIDE[kind]])
    PIL.new("RGB", (4, 4)).save(d / "img" / "ok.png")
    os.symlink(tmp_path / "outside.png", d / "img" / "link.png")
    monkeypatch.setenv("DSOM_CACHE", str(tmp_path / "cache"))
    err = one_line_exit_2(["run", str(d), "-o", str(finished[0]), "--force", "--modalities", "structure,image",
                           "--set", "features.image_model=/nonexistent", *FAST], capsys)
    assert "images.tsv:3" in err and ("outside" in err or "absolute" in err)
    assert_intact(finished)
    from dsom.data.readers import load_dataset
    from dsom.features.image import read_images_tsv

    assert len(read_images_tsv(load_dataset(d), allow_outside=True).paths[0 if kind != "deep_dotdot" else 1]) == 1


def test_unreadable_images_are_skipped_and_counted(data, tiny_vit, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    from dsom.data.readers import load_dataset
    from dsom.features import image as image_mod

    d = _image_folder(data, tmp_path, ["e0\timg/ok.png", "e0\timg/fifo.png", "e1\timg/dir.png",
                                       "e1\timg/bomb.png", "e2\timg/garbage.png", "e2\timg/loop.png",
                                       "e3\timg/missing.png", "e3\timg/ok.png"])
    PIL.new("RGB", (20, 20), (200, 10, 10)).save(d / "img" / "ok.png")
    os.mkfifo(d / "img" / "fifo.png")
    (d / "img" / "dir.png").mkdir()
    (d / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    os.symlink(d / "img" / "loop.png", d / "img" / "loop.png")
    PIL.new("1", (3000, 3000)).save(d / "img" / "bomb.png")  # 9 MP: over the limit set below, tiny on disk
    ds = load_dataset(d)
    images = image_mod.read_images_tsv(ds)
    old = image_mod.MAX_IMAGE_PIXELS
    image_mod.MAX_IMAGE_PIXELS = 1_000_000
    try:
        with pytest.warns(Warning, match="unreadable"):
            feats, present, bad = image_mod.encode_images(images, ds.num_entities, tiny_vit, progress=False)
    finally:
        image_mod.MAX_IMAGE_PIXELS = old
    assert bad == 6
    assert present[:4].tolist() == [True, False, False, True]
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(feats[0], feats[3], atol=1e-6)


# ------------------------------------------------------------------------------------------ checkpoints and results
def _corrupt_checkpoint(kind: str, ck: Path) -> str:
    """Damage a copied checkpoint folder; returns the file name the message must name."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = ck / "model.safetensors"
    tensors = load_file(str(weights))
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "huge_header":
        weights.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    elif kind == "empty_weights":
        weights.write_bytes(b"")
    elif kind == "garbage_weights":
        weights.write_bytes(os.urandom(256))
    elif kind == "missing_entity":
        save_file({"relation": tensors["relation"]}, str(weights))
    elif kind == "entity_rows_short":
        save_file({**tensors, "entity": tensors["entity"][:-1].contiguous()}, str(weights))
    elif kind == "odd_width":
        save_file({"entity": tensors["entity"][:, :-1].contiguous(),
                   "relation": tensors["relation"][:, :-1].contiguous()}, str(weights))
    elif kind == "int_tensor":
        save_file({**tensors, "entity": tensors["entity"].to(torch.int32)}, str(weights))
    elif kind == "vector_entity":
        save_file({**tensors, "entity": tensors["entity"].flatten().contiguous()}, str(weights))
    elif kind == "meta_list":
        (ck / "meta.json").write_text("[1, 2, 3]")
        return "meta.json"
    elif kind == "meta_invalid":
        (ck / "meta.json").write_text('{"format": ')
        return "meta.json"
    elif kind == "meta_format":
        meta = json.loads((ck / "meta.json").read_text())
        (ck / "meta.json").write_text(json.dumps({**meta, "format": "keras/9"}))
        return "meta.json"
    elif kind == "meta_model_string":
        meta = json.loads((ck / "meta.json").read_text())
        (ck / "meta.json").write_text(json.dumps({**meta, "model": "complex"}))
        return "meta.json"
    elif kind == "no_entities_tsv":
        (ck / "entities.tsv").unlink()
        return "entities.tsv"
    elif kind == "entities_tsv_directory":
        (ck / "entities.tsv").unlink()
        (ck / "entities.tsv").mkdir()
        return "entities.tsv"
    else:
        raise AssertionError(kind)
    return "model.safetensors"


CHECKPOINT_CASES = ["truncated", "huge_header", "empty_weights", "garbage_weights", "missing_entity",
                    "entity_rows_short", "odd_width", "int_tensor", "vector_entity", "meta_list", "meta_invalid",
                    "meta_format", "meta_model_string", "no_entities_tsv", "entities_tsv_directory"]


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_damaged_checkpoint_is_named(kind, command, data, finished, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(finished[0] / "checkpoints" / "student" / "final", ck)
    name = _corrupt_checkpoint(kind, ck)
    argv = (["evaluate", str(ck), "--dataset", str(data), "-q"] if command == "evaluate" else
            ["predict", str(ck), "--dataset", str(data), "--head", "e0", "--relation", "r0"])
    assert name in one_line_exit_2(argv, capsys)


@pytest.mark.parametrize("kind", ["tables_missing", "modalities_not_a_list", "modalities_count"])
def test_damaged_teachers_checkpoint_is_named(kind, data, finished, tmp_path, capsys):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(finished[0] / "checkpoints" / "teachers" / "final", ck)
    meta = json.loads((ck / "meta.json").read_text())
    if kind == "tables_missing":
        tensors = load_file(str(ck / "model.safetensors"))
        save_file({"relations": tensors["relations"]}, str(ck / "model.safetensors"))
    elif kind == "modalities_not_a_list":
        meta["model"]["modalities"] = "structure"
    else:
        meta["model"]["modalities"] = ["structure", "text"]
    (ck / "meta.json").write_text(json.dumps(meta))
    one_line_exit_2(["evaluate", str(ck), "--dataset", str(data), "-q"], capsys)
    one_line_exit_2(["distill", str(data), "--teachers", str(ck), "-o", str(finished[0]), "--force", *FAST], capsys)
    assert_intact(finished)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not_a_state", "pickled_object"])
def test_damaged_train_state_on_resume_is_named(kind, finished, tmp_path, capsys):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    (run / "results.json").unlink()
    state = run / "checkpoints" / "teachers" / "last" / "train_state.pt"
    if kind == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif kind == "garbage":
        state.write_bytes(b"\x00" * 64)
    elif kind == "not_a_state":
        torch.save([1, 2, 3], state)
    else:
        torch.save({"optimizer": Path("x"), "trainer": {}}, state)
    err = one_line_exit_2(["run", "-o", str(run), "--resume", "-q"], capsys)
    assert "train_state.pt" in err and "weights_only" not in err


RESULTS_CASES = {"invalid_json": '{"models": ', "a_list": "[]", "no_models": '{"dataset": {}}',
                 "no_counts": '{"dataset": {"name": "x"}, "models": {}}',
                 "metric_missing": '{"dataset": {"name": "x", "entities": 1, "relations": 1, "train": 1, "valid": 1, '
                                   '"test": 1}, "models": {"student": {"test": {"realistic": {}}}}}',
                 "binary": "\udcff"}


@pytest.mark.parametrize("kind", list(RESULTS_CASES))
def test_report_of_a_damaged_results_file(kind, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(RESULTS_CASES[kind].encode("utf-8", "surrogateescape"))
    assert "results.json" in one_line_exit_2(["report", str(run)], capsys)
    assert not (run / "report").exists()


def test_report_of_the_finished_run_still_works(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    assert main(["report", str(run)]) == 0


def test_pickled_feature_file_names_the_real_option(data, finished, tmp_path, capsys):
    import torch

    f = tmp_path / "f.pt"
    torch.save({"e0": Path("x")}, f)
    err = one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", "--modalities", "structure,extra",
                           "--set", f"features.files.extra={f}", *FAST], capsys)
    assert "features.allow_pickle=true" in err and "--allow-pickle" not in err
    assert_intact(finished)


@pytest.mark.parametrize("shape", [(60, 0), (0, 8)], ids=["no_columns", "no_rows"])
def test_empty_feature_matrix_is_refused(shape, data, finished, tmp_path, capsys):
    import numpy as np

    f = tmp_path / "f.npy"
    np.save(f, np.zeros(shape, dtype=np.float32))
    err = one_line_exit_2(["run", str(data), "-o", str(finished[0]), "--force", "--modalities", "structure,extra",
                           "--set", f"features.files.extra={f}", *FAST], capsys)
    assert "empty" in err and "f.npy" in err
    assert_intact(finished)


def test_cli_warnings_and_a_closed_pipe_through_the_real_command(data, tmp_path):
    """`dsom data info | head -1`: no BrokenPipeError at exit; warnings are one line without source code."""
    d = tmp_path / "kg"
    d.mkdir()
    for f in data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "valid.tsv").write_text("")  # a DataWarning
    dsom = Path(sys.executable).with_name("dsom")
    cmd = f"'{dsom}' data info '{d}' | head -1" if dsom.exists() else \
        f"'{sys.executable}' -m dsom.cli data info '{d}' | head -1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("Dataset"), proc
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    warns = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert warns and all(ln.startswith("dsom: warning:") for ln in warns), proc.stderr


def test_cache_folder_that_is_a_file(data, finished, tmp_path, capsys, monkeypatch):
    d = tmp_path / "kg"
    d.mkdir()
    for f in data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "numeric.tsv").write_text("entity\tattribute\tvalue\ne1\theight\t2.0\n")
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("DSOM_CACHE", str(tmp_path / "cache"))
    one_line_exit_2(["run", str(d), "-o", str(finished[0]), "--force", "--modalities", "structure,numeric", *FAST],
                    capsys)
    assert_intact(finished)


def test_output_that_is_a_symlink_loop(data, tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "symlink" in one_line_exit_2(["run", str(data), "-o", str(tmp_path / "loop"), *FAST], capsys)
