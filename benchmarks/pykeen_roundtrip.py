"""Export a trained dsom model to PyKEEN, load it with PyKEEN, and compare both libraries' scores.

    python benchmarks/pykeen_roundtrip.py RUN_DIR [--teacher MODALITY] [--queries 2000] [-o EXPORT_DIR]

Prints the largest absolute and relative difference between dsom's ``score_all`` and PyKEEN's ``predict_t``
(tails) and ``predict_h`` (heads, through dsom's reciprocal relations) on random (entity, relation) queries
against every entity, and whether PyKEEN ranks the same top answer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dsom.cli import main as dsom_main
from dsom.interop import load_pykeen
from dsom.train.checkpoint import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--teacher", help="export this teacher instead of the student")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("-o", "--output", help="export folder (default: a temporary one)")
    args = ap.parse_args()
    run = Path(args.run_dir)
    dest = Path(args.output or tempfile.mkdtemp(prefix="dsom-pykeen-")) / "export"
    assert dsom_main(["export", str(run), "-o", str(dest), *(["--teacher", args.teacher] if args.teacher else [])]) == 0
    pk, factory = load_pykeen(dest)
    ck = load_checkpoint(run / "checkpoints" / "teachers" / "final" if args.teacher else run)
    ours = ck.teachers.view([args.teacher]) if args.teacher else ck.model
    E, R = len(ck.entities), len(ck.relations)
    g = torch.Generator().manual_seed(0)
    h, r = torch.randint(E, (args.queries,), generator=g), torch.randint(R, (args.queries,), generator=g)
    pk.eval()
    with torch.no_grad():
        for name, mine, theirs in (("tails (h, r, ?)", ours.score_all(h, r), pk.predict_t(torch.stack([h, r], 1))),
                                   ("heads (?, r, t)", ours.score_all(h, r + R), pk.predict_h(torch.stack([r, h], 1)))):
            diff = (mine - theirs).abs()
            rel = diff.max() / mine.abs().max()
            same_top = float((mine.argmax(1) == theirs.argmax(1)).float().mean())
            print(f"{name}: {args.queries} queries x {E} entities; max |dsom - pykeen| {diff.max():.3g} "
                  f"(relative to the largest score {rel:.3g}); same top answer on {same_top:.2%}")
    print(f"PyKEEN model {type(pk).__name__}, {factory.num_entities} entities, {factory.num_relations} relations "
          f"(with inverses); export in {dest}")


if __name__ == "__main__":
    main()
