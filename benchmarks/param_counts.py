"""Build the paper's DB15K modules and print their trainable parameter counts (SPEC §5.1, §7, §10).

    python benchmarks/param_counts.py            # no dataset files needed: DB15K sizes are E=12,842, R=279

Teachers: structure + visual (768-d ViT CLS) + textual (768-d BERT) at d = 2000 (paper: 64.2M).
Student: plain ComplEx at d = 2000, 1000, 512, 64 (paper: 53.6M, 26.8M, 13.72M, 1.72M); the policy MLP
(3E -> 1024 -> 7) is reported separately, as the paper's counts exclude it.
"""

from __future__ import annotations

import torch

from dsom.config import DistillConfig
from dsom.distill.distiller import Distiller
from dsom.models.teachers import FrozenTeachers, ModalityTeachers

E, R = 12842, 279
PAPER = {"teachers": 64.2e6, 2000: 53.6e6, 1000: 26.8e6, 512: 13.72e6, 64: 1.72e6}


def main() -> None:
    feats = {"image": torch.zeros(E, 768), "text": torch.zeros(E, 768)}
    t = ModalityTeachers(E, 2 * R, 2000, feats)
    n = t.num_parameters()
    print(f"teachers (S + V + D, d=2000): {n:,} (formula {ModalityTeachers.parameter_count(E, 2 * R, 2000, [768, 768]):,}; "
          f"paper {PAPER['teachers'] / 1e6:.1f}M)")
    del t
    for d in (2000, 1000, 512, 64):
        frozen = FrozenTeachers(["structure", "image", "text"], torch.zeros(3, E, 2), torch.zeros(3, 2 * R, 2))
        dist = Distiller(frozen, 2 * R, d, DistillConfig(policy_state="logits"))  # the paper's policy
        student = dist.student.num_parameters()
        policy = sum(p.numel() for p in dist.policy.parameters())
        summary = sum(p.numel() for p in Distiller(frozen, 2 * R, 2, DistillConfig()).policy.parameters())
        print(f"student d={d}: {student:,} (paper {PAPER[d] / 1e6:.2f}M); paper policy MLP {policy:,} (excluded by "
              f"the paper); dsom summary policy {summary:,}")


if __name__ == "__main__":
    main()
