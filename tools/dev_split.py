"""A development copy of a dataset folder whose valid split is a held-out slice of train, for choices on a benchmark
whose valid split cannot be used (DB15K's overlaps test; its clean copy keeps 73 triples).

    python tools/dev_split.py ../shared/data/DB15K /tmp/db15k-dev --triples 3000 --seed 0

``OUT/train.tsv`` is the folder's train.tsv without ``--triples`` lines drawn at random (``--seed``), which become
``OUT/valid.tsv``; every other file of the folder is linked, not copied (test stays as it is, and is not for choices).
Canonical layout only (``train.tsv`` of tab-separated ``head relation tail`` lines). The draw is Python's
``random.Random(seed).sample`` over line numbers, so a seed always gives the same split.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def split(src: Path, out: Path, triples: int, seed: int) -> tuple[int, int]:
    """Write the development folder; returns (train lines, valid lines) written."""
    train = src / "train.tsv"
    if not train.is_file():
        raise SystemExit(f"dev_split: {train} not found; the folder must be in the canonical layout (train.tsv)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"dev_split: {out} exists and is not empty; choose a new folder")
    lines = [line for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 0 < triples < len(lines):
        raise SystemExit(f"dev_split: --triples must be between 1 and {len(lines) - 1} (train has {len(lines)} lines)")
    held = set(random.Random(seed).sample(range(len(lines)), triples))
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name not in ("train.tsv", "valid.tsv"):
            (out / item.name).symlink_to(item.resolve())
    (out / "valid.tsv").write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i in held), encoding="utf-8")
    (out / "train.tsv").write_text("".join(f"{x}\n" for i, x in enumerate(lines) if i not in held), encoding="utf-8")
    return len(lines) - triples, triples


def main(argv: list[str] | None = None) -> tuple[int, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the dataset folder (canonical layout)")
    ap.add_argument("out", type=Path, help="the new folder (must not exist, or be empty)")
    ap.add_argument("--triples", type=int, default=3000, help="train triples held out as valid (default 3000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = ap.parse_args(argv)
    n_train, n_valid = split(args.folder, args.out, args.triples, args.seed)
    print(f"{args.out}: train {n_train:,} triples, valid {n_valid:,} held out of {args.folder}/train.tsv "
          f"(seed {args.seed}); other files linked")
    return n_train, n_valid


if __name__ == "__main__":
    main(sys.argv[1:])
