"""Time DSoM stage-2 training steps (teacher scoring + student + policy + NDKD) on a dataset.

Teachers are random materialised tables of the requested rank (timing does not depend on their values).
Prints seconds per batch for the full step and for its parts, and the projected seconds per epoch.

    DSOM_DATA=../shared/data python benchmarks/distill_step.py DB15K --teachers 3 --rank 64 --policy-hidden 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from dsom.config import DistillConfig
from dsom.data import registry
from dsom.distill.distiller import Distiller
from dsom.models.teachers import FrozenTeachers


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--policy-hidden", type=int, default=1024)
    p.add_argument("--selector", default="rl")
    p.add_argument("--state", default="summary", choices=["summary", "logits"], help="policy state (paper: logits)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    ds = registry.load(args.dataset)
    E, R2, M = ds.num_entities, 2 * ds.num_relations, args.teachers
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers([f"t{i}" for i in range(M)], torch.randn(M, E, 2 * args.rank, generator=g) * 0.1,
                            torch.randn(M, R2, 2 * args.rank, generator=g) * 0.1)
    dc = DistillConfig(selector=args.selector, policy_hidden=args.policy_hidden, policy_state=args.state)
    model = Distiller(frozen, R2, args.rank, dc, generator=g)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    q = torch.from_numpy(ds.queries("train")[: args.batch_size])
    nb = ds.neighbour_index
    mask = torch.zeros(len(q), E, dtype=torch.bool)
    rows, cols = nb.pairs(q[:, 0], q[:, 1])
    mask[rows, cols] = True

    def step() -> None:
        losses, _ = model(q, mask, precision=args.precision)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    n_batches = -(-2 * len(ds.train) // args.batch_size)
    full = timed(step, args.batches)
    teach = timed(lambda: frozen.score_all(q[:, 0], q[:, 1], args.precision), args.batches)
    with torch.no_grad():
        scores = frozen.score_all(q[:, 0], q[:, 1])
    pol = 0.0
    if model.policy is not None:
        from dsom.distill.selectors import SelectionBatch

        sb = SelectionBatch(scores, q[:, 0], q[:, 1], q[:, 2])

        def policy_fb() -> None:
            model.selector.action_logits(sb).sum().backward()
        pol = timed(policy_fb, args.batches)
    print(f"{ds.name}: E={E}, M={M}, rank {args.rank}, policy hidden {args.policy_hidden}, {args.precision}, "
          f"{torch.get_num_threads()} threads")
    print(f"full step {full:.3f} s/batch -> {full * n_batches:.0f} s/epoch ({n_batches} batches)")
    print(f"  teacher scoring {teach:.3f} s, policy forward+backward {pol:.3f} s")


if __name__ == "__main__":
    main()
