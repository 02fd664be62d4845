"""The compiled stage-2 element-wise work on two score layouts, and the reward CEs in one compiled pass or two.

    python benchmarks/terms_layout.py --rounds 8            # DB15K's shape: B = 1,000, E = 12,842, three teachers

Each round times, interleaved, the compiled CE + NDKD terms (:func:`~dsom.distill.distiller.step_terms`, forward and
backward) and every subset's reward CE (:class:`~dsom.distill.selectors.AllActionCEs`) on

* ``row`` scores: ``(B, E)`` rows, the teachers a ``(B, M, E)`` block viewed as ``(M, B, E)``, what dsom uses;
* ``col`` scores: the same values stored transposed, ``(E, B)`` and ``(M, E, B)`` viewed as ``(B, E)`` / ``(M, B, E)``
  (what the column products write before :func:`~dsom.models.products.column_scores` copies them into rows),

and the reward CEs written as one compiled function (the maxima and the exponential sums of the combined logits in one
graph, ``fused``) against dsom's two passes. Random logits (N(0, 3^2)), random subsets per row, a neighbour mask with
five random answers per row plus the target. Prints each median (ms) and the largest difference from the ``row``
values. Set the AVX2 emulation variables (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``) to time the AVX2 path.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from dsom.config import DistillConfig
from dsom.distill.actions import subset_matrix
from dsom.distill.distiller import mask_recomputed, step_terms
from dsom.distill.selectors import AllActionCEs, _subset_logits
from dsom.numerics import floor_exp
from dsom.perf import MaybeCompiled


def fused_ces(tea: torch.Tensor, coef: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(A, n)`` reward CEs of :class:`AllActionCEs` as one function: maxima and exponential sums in one graph."""
    z = _subset_logits(tea, coef)
    top = z.amax(-1)
    total = floor_exp(z - top.unsqueeze(-1)).sum(-1)
    at_target = tea.float().gather(-1, target.view(1, -1, 1).expand(tea.shape[0], -1, 1)).squeeze(-1)
    return (top + torch.log(total)).T - coef @ at_target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--entities", type=int, default=12842)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args(argv)
    B, E, M = args.batch, args.entities, args.teachers
    g = torch.Generator().manual_seed(0)
    cfg = DistillConfig()
    terms = MaybeCompiled(mask_recomputed(step_terms), True)
    two_pass = AllActionCEs()
    one_pass = MaybeCompiled(fused_ces, True)
    subsets = subset_matrix(M)
    target = torch.randint(0, E, (B,), generator=g)
    weights = subsets[torch.randint(0, len(subsets), (B,), generator=g)]
    student = torch.randn(B, E, generator=g) * 3
    teachers = torch.randn(M, B, E, generator=g) * 3
    mask = torch.zeros(B, E, dtype=torch.bfloat16)
    mask[torch.randint(0, B, (5 * B,), generator=g), torch.randint(0, E, (5 * B,), generator=g)] = 1
    mask[torch.arange(B), target] = 1
    layouts = {"row": (student.clone(), teachers.permute(1, 0, 2).contiguous().permute(1, 0, 2), mask),
               "col": (student.T.contiguous(), teachers.permute(0, 2, 1).contiguous().permute(0, 2, 1),
                       mask.T.contiguous().T)}

    def run(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        stored, tea, nb = layouts[name]
        leaf = stored.requires_grad_(True)
        s = leaf if name == "row" else leaf.T
        t0 = time.perf_counter()
        out = terms(s, tea, weights, target, nb, cfg, True)
        t1 = time.perf_counter()
        (out["ce"].mean() + out["kd"].mean()).backward()
        t2 = time.perf_counter()
        ces = two_pass(tea, subsets, target, 1.0)
        t3 = time.perf_counter()
        res = {"ce": out["ce"].detach(), "kd": out["kd"].detach(), "ces": ces, "grad": leaf.grad if name == "row"
               else leaf.grad.T}
        leaf.grad = None
        if name == "row":
            t4 = time.perf_counter()
            res["fused"] = one_pass(tea, subsets, target)
            return [t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t4], res
        return [t1 - t0, t2 - t1, t3 - t2], res

    for name in layouts:  # compile, warm up
        run(name)
        run(name)
    times: dict[str, list[list[float]]] = {name: [] for name in layouts}
    for r in range(args.rounds):
        for name in (("row", "col") if r % 2 == 0 else ("col", "row")):
            times[name].append(run(name)[0])
    _, ref = run("row")
    _, col = run("col")
    diff = {k: float((ref[k] - col[k]).abs().max()) for k in ("ce", "kd", "ces", "grad")}
    diff["fused"] = float((ref["fused"] - ref["ces"]).abs().max())
    med = {name: np.median(np.array(v), 0) * 1e3 for name, v in times.items()}
    res = {"row_ms": {"terms_forward": med["row"][0], "terms_backward": med["row"][1], "reward_ces": med["row"][2],
                      "reward_ces_fused": med["row"][3]},
           "col_ms": {"terms_forward": med["col"][0], "terms_backward": med["col"][1], "reward_ces": med["col"][2]},
           "max_abs_diff": diff}
    res = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in res.items()}
    print(f"B = {B}, E = {E}, {M} teachers, median of {args.rounds} (ms): "
          f"row: terms forward {res['row_ms']['terms_forward']:.1f}, backward {res['row_ms']['terms_backward']:.1f}, "
          f"reward CEs {res['row_ms']['reward_ces']:.1f} (one fused pass {res['row_ms']['reward_ces_fused']:.1f}); "
          f"col: terms forward {res['col_ms']['terms_forward']:.1f}, backward {res['col_ms']['terms_backward']:.1f}, "
          f"reward CEs {res['col_ms']['reward_ces']:.1f}")
    print("largest difference from the row values: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "args": vars(args)}, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
