"""The evaluation-time baseline "w/ RC on val." (SPEC §6, Table 4).

The policy (same MLP and action space) is trained with REINFORCE on the *valid* queries, with unfiltered
teacher logits as the state. There is no student, so the comparator of Eq. (8) is the Teacher-Avg.
ensemble: ``R = +1`` if the chosen subset's CE beats the all-teacher mean, else ``-10``; ``R_hat = -10``
(the mean never strictly beats itself), so ``delta`` is 0 or 11. At test time each query takes the
arg-max action and is ranked by the mean of the chosen teachers' logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from dsom.config import Config
from dsom.data.graph import KGDataset
from dsom.distill.actions import action_names, num_actions, subset_matrix
from dsom.distill.losses import per_query_ce
from dsom.distill.policy import reinforce_loss, triple_rewards
from dsom.distill.selectors import SelectorContext, build_policy, policy_logits
from dsom.models.teachers import FrozenTeachers


class PolicyEnsemble:
    """Scorer: per query, the mean logits of the policy's arg-max teacher subset."""

    def __init__(self, teachers: FrozenTeachers, policy: torch.nn.Module, state: str = "logits") -> None:
        self.teachers, self.policy, self.state = teachers, policy, state
        self.subsets = subset_matrix(teachers.num_teachers).to(teachers.tables.device)

    @torch.no_grad()
    def actions(self, scores: torch.Tensor, head: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        return policy_logits(self.policy, self.state, scores, head, relation).argmax(-1)

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        full = self.teachers.score_all(head, relation, precision)  # the state needs every entity
        w = self.subsets[self.actions(full, head, relation)]
        return torch.einsum("bm,mbe->be", w, full[:, :, start:stop])


def train_rc_on_valid(teachers: FrozenTeachers, ds: KGDataset, cfg: Config, device: torch.device | str = "cpu",
                      progress: bool = False) -> tuple[PolicyEnsemble, dict[str, Any]]:
    dc = cfg.distill
    g = torch.Generator().manual_seed(cfg.train.seed)
    M = teachers.num_teachers
    # test queries have no known target, so this policy never reads per-entity statistics
    ctx = SelectorContext(teachers.modalities, teachers.num_entities, 2 * ds.num_relations,
                          dataclasses.replace(dc, policy_entity_stats="none"), g)
    policy = build_policy(ctx).to(device)
    opt = torch.optim.Adagrad(policy.parameters(), lr=dc.policy_lr or cfg.train.lr)
    subsets = subset_matrix(M).to(device)
    q = torch.from_numpy(ds.queries("valid")).to(device)
    history = []
    for epoch in tqdm(range(1, dc.rc_val_epochs + 1), desc="RC on valid", disable=not progress, leave=False):
        perm = torch.randperm(len(q), generator=g).to(device)
        counts = torch.zeros(num_actions(M), dtype=torch.int64)
        deltas = []
        for s in range(0, len(q), cfg.train.batch_size):
            b = q[perm[s:s + cfg.train.batch_size]]
            with torch.no_grad():
                scores = teachers.score_all(b[:, 0], b[:, 1])
            logits = policy_logits(policy, dc.policy_state, scores, b[:, 0], b[:, 1])
            actions = torch.multinomial(logits.detach().softmax(-1).cpu(), 1, generator=g).squeeze(1).to(device)
            with torch.no_grad():
                tea = torch.einsum("bm,mbe->be", subsets[actions], scores)
                # Eq. (8) with the Teacher-Avg. ensemble in the student's place
                reward = triple_rewards(tea, per_query_ce(scores.mean(0), b[:, 2]), b[:, 2],
                                        dc.reward_positive, dc.reward_negative)
                delta = reward - dc.reward_negative
            loss = reinforce_loss(logits, actions, delta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            counts += torch.bincount(actions.cpu(), minlength=num_actions(M))
            deltas.append(float(delta.mean()))
        history.append({"epoch": epoch, "delta": sum(deltas) / max(len(deltas), 1),
                        "actions": dict(zip(action_names(teachers.modalities), counts.tolist()))})
    policy.eval()
    return PolicyEnsemble(teachers, policy, dc.policy_state), {"history": history, "valid_queries": int(len(q))}
