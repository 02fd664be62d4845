"""Training epochs with and without CUDA graphs (``train.cuda_graphs``): seconds per epoch, and how far the graphed
model is from the eager one after the same epochs.

For each phase (``complex``: one structural ComplEx; ``teachers``: stage 1 with ``--modalities`` and random features
of the real widths; ``distill``: stage 2 as ``speed.py`` builds it, random teachers and held-out rewards) it trains ``--epochs`` epochs of the dataset twice from the same initialisation, ``cuda_graphs``
``off`` then ``on`` (the trainers' own epoch loop: shuffling, the short last batch, the optimizer), and prints the
seconds of every epoch (the first includes compilation and, graphed, the capture), the steps replayed, any capture
failure, and the largest difference between the two runs' parameters. ``--sync-scan`` first runs one eager epoch under
``torch.cuda.set_sync_debug_mode("warn")`` and prints each operation that waited for the GPU (what a capture cannot
hold). Stage 2 is captured again when its caches seal (after the first epoch): ``captures`` counts the graphs.

    python benchmarks/cuda_graphs.py DB15K --rank 500 --epochs 3 --sync-scan      # on a GPU
    python benchmarks/cuda_graphs.py synthetic --device cpu --capture rerun        # the bookkeeping, without CUDA

``--capture rerun`` stands in for the capture by re-running the step (no speed-up; for machines without CUDA); its
eager run then updates with the graph's ``DeviceAdagradStep``, as eager steps on CUDA do, so the two runs should agree
exactly there too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed import base_config, phase_trainer, sync  # noqa: E402  (next door)

from dsom.config import set_value  # noqa: E402
from dsom.data import registry  # noqa: E402
from dsom.train.graphs import cuda_capture, rerun_capture  # noqa: E402
from dsom.train.loop import Trainer, resolve_device  # noqa: E402
from dsom.train.optim import DeviceAdagradStep, device_adagrad_problem  # noqa: E402

PHASES = ("complex", "teachers", "distill")
SCAN_ONLY: tuple[str, ...] = ()  # phases that get the sync scan and eager epochs only (none since stage 2 is captured)


def make_trainer(phase: str, ds: Any, args: argparse.Namespace, graphs: str, device: torch.device,
                 tmp: str) -> Trainer:
    ns = argparse.Namespace(rank=args.rank, batch_size=args.batch_size, precision=args.precision,
                            batching="triples", compile=args.compile)
    cfg = base_config(ns, device)
    set_value(cfg, "train.cuda_graphs", graphs)
    tr = phase_trainer(phase, ds, cfg, args.modalities, tmp)
    tr.graph_capture = rerun_capture if args.capture == "rerun" else cuda_capture  # type: ignore[assignment]
    if args.capture == "rerun" and device_adagrad_problem(tr.optimizer) is None:
        # eager steps update as a graph does, as they do on CUDA (Trainer.device_update): the two runs then compute
        # the same, and a difference is the graph's (the CPU's own Adagrad rounds differently, and stage 2's policy
        # amplifies that within an epoch)
        tr._device_update = DeviceAdagradStep(tr.optimizer, tr.compiled)  # type: ignore[arg-type]
        tr._device_update_checked = True
    return tr


def train(tr: Trainer, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` epochs of the trainer's own loop (the device synchronised at both ends)."""
    seconds = []
    for epoch in range(1, epochs + 1):
        sync(tr.device)
        t0 = time.perf_counter()
        tr.train_epoch(epoch)
        tr.epoch_extras(epoch)  # (as fit does after an epoch: stage 2's caches seal here)
        sync(tr.device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def sync_scan(phase: str, ds: Any, args: argparse.Namespace, device: torch.device) -> list[str]:
    """The distinct warnings of one eager epoch under ``set_sync_debug_mode("warn")`` (each names an op that waits
    for the device)."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(phase, ds, args, "off", device, tmp)
        train(tr, 1)  # compile first: compilation itself may wait for the device
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tr.train_epoch(2)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    found: dict[str, int] = {}
    for w in caught:
        key = f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:160]}"
        found[key] = found.get(key, 0) + 1
    return [f"{n}x {k}" for k, n in sorted(found.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="a dataset name or folder (DB15K, synthetic, ...)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, of {', '.join(PHASES + SCAN_ONLY)} ({', '.join(SCAN_ONLY)}: the sync scan "
                        "and eager epochs only)")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--device", default="cuda")
    p.add_argument("--capture", default="cuda", choices=("cuda", "rerun"))
    p.add_argument("--sync-scan", action="store_true", help="list the ops of an eager epoch that wait for the GPU")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)
    if not set(args.phases.split(",")) <= set(PHASES + SCAN_ONLY):
        raise SystemExit(f"--phases: of {', '.join(PHASES + SCAN_ONLY)} (got {args.phases!r})")
    device = resolve_device(args.device)
    ds = registry.load(args.dataset)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "dataset": args.dataset, "rank": args.rank,
                           "batch_size": args.batch_size, "capture": args.capture}
    for phase in args.phases.split(","):
        if args.sync_scan and device.type == "cuda":
            out[f"{phase}/syncs"] = sync_scan(phase, ds, args, device)
            print(f"{phase}: {len(out[f'{phase}/syncs'])} distinct syncing ops in an eager epoch", flush=True)
            for line in out[f"{phase}/syncs"][:12]:
                print("   ", line, flush=True)
        runs = {}
        for graphs in ("off",) if phase in SCAN_ONLY else ("off", "on"):
            with tempfile.TemporaryDirectory() as tmp:
                tr = make_trainer(phase, ds, args, graphs, device, tmp)
                try:
                    seconds = train(tr, args.epochs)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next run
                    out[f"{phase}/{graphs}"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                    print(f"{phase} graphs={graphs}: {out[f'{phase}/{graphs}']['error']}", flush=True)
                    continue
                g = tr.graph_step()
                rec = {"epoch_s": [round(s, 4) for s in seconds], "precision": tr.precision,
                       "batches_per_epoch": len(tr.epoch_batches(1)[1]) - 1,
                       "replays": g.replays if g else 0, "captures": g.captures if g else 0,
                       "capture_failed": g.failed if g else None}
                runs[graphs] = {k: v.detach().float().cpu() for k, v in tr.model.named_parameters()}
                out[f"{phase}/{graphs}"] = rec
                print(f"{phase} graphs={graphs}: s/epoch {rec['epoch_s']} ({rec['precision']}); replays "
                      f"{rec['replays']} of {rec['captures']} captures; capture failed: {rec['capture_failed']}",
                      flush=True)
        if len(runs) == 2:
            diff = {k: float((runs["on"][k] - runs["off"][k]).abs().max()) for k in runs["off"]}
            scale = {k: float(runs["off"][k].abs().max()) for k in runs["off"]}
            out[f"{phase}/max_abs_diff"] = diff
            print(f"{phase}: max |graphed - eager| per parameter {diff} (max |eager| {scale})", flush=True)
            off, on = out[f"{phase}/off"]["epoch_s"], out[f"{phase}/on"]["epoch_s"]
            if len(off) > 1:
                print(f"{phase}: after the first epoch {min(off[1:]):.3f} s/epoch eager, {min(on[1:]):.3f} graphed "
                      f"({min(off[1:]) / max(min(on[1:]), 1e-9):.1f}x)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
