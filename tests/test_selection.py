"""Teacher selection: held-out rewards, temperature calibration, the summary state, the policy's losses,
the selector registry and the presets, each against an independent computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsom.config import METHOD_PRESETS, Config, DistillConfig, apply_dict
from dsom.distill.actions import subset_matrix
from dsom.distill.holdout import fit_temperatures, holdout_mask, reward_rows, teacher_ce, teacher_dataset
from dsom.distill.policy import action_ces, action_rewards, summary_features
from dsom.distill.selectors import SELECTORS, PolicySelector, SelectionBatch, SelectorContext, make_selector
from dsom.errors import ConfigError
from dsom.models.teachers import FrozenTeachers

from toy import clustered_graph, random_teachers


def _frozen(ds, M=3, d=8, seed=7):
    return random_teachers(ds, M, d, seed, scale=0.5)


def test_holdout_mask_is_seeded_sized_and_both_directions():
    m = holdout_mask(1000, 0.1, seed=3)
    assert m.sum() == 100 and np.array_equal(m, holdout_mask(1000, 0.1, seed=3))
    assert not np.array_equal(m, holdout_mask(1000, 0.1, seed=4))
    assert holdout_mask(10, 0.0).sum() == 0
    with pytest.raises(ConfigError):
        holdout_mask(10, 1.0)
    ds = clustered_graph(num_entities=50)
    rows = reward_rows(ds, 0.2, 1)
    n = len(ds.train)
    assert len(rows) == 2 * n and torch.equal(rows[:n], rows[n:])
    tds = teacher_dataset(ds, 0.2, 1)
    held = ds.train[rows[:n].numpy()]
    keys = {tuple(x) for x in tds.train.tolist()}
    assert len(tds.train) == n - len(held) and not any(tuple(x) in keys for x in held.tolist())
    assert tds.filter_index is ds.filter_index  # filtering still knows the held-out triples


class _Table:
    """Teachers whose logits for query ``(i, r)`` are row ``i`` of a fixed ``(M, n, E)`` tensor."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z, self.num_teachers = z, z.shape[0]

    def score_all(self, head, relation, precision="fp32"):
        return self.z[:, head].clone()


def test_fitted_temperatures_minimise_the_ce_like_a_grid_search():
    g = torch.Generator().manual_seed(0)
    n, E = 300, 40
    t = torch.randint(0, E, (n,), generator=g)
    signal = F.one_hot(t, E).float()
    # an over-confident, a calibrated-ish and an under-confident teacher
    z = torch.stack([20 * signal + 6 * torch.randn(n, E, generator=g),
                     3 * signal + torch.randn(n, E, generator=g),
                     0.3 * signal + 0.15 * torch.randn(n, E, generator=g)])
    q = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long), t], 1)
    fr = _Table(z)
    T = fit_temperatures(fr, q, batch_size=128)
    grid = torch.exp(torch.linspace(-5, 5, 4001, dtype=torch.float64))
    for m in range(3):
        ce = torch.stack([F.cross_entropy(z[m].double() / s, t) for s in grid])
        assert float(T[m]) == pytest.approx(float(grid[ce.argmin()]), rel=0.01)
    assert float(T[0]) > 1.0 > float(T[2])
    assert (teacher_ce(fr, q, T) <= teacher_ce(fr, q) + 1e-6).all()


def test_temperature_fit_with_a_few_confident_mistakes():
    """The MKG-Y structural teacher's case: mostly right, a few targets far below very confident wrong answers
    (an undamped Newton step oscillated there and returned a temperature that raised the CE)."""
    g = torch.Generator().manual_seed(1)
    n, E = 400, 300
    t = torch.randint(0, E, (n,), generator=g)
    z = 4 * torch.randn(n, E, generator=g)
    z[torch.arange(n), t] += 10.0
    bad = torch.arange(n) < 60
    z[bad, (t[bad] + 1) % E] += 40.0  # confidently wrong on 15% of the queries
    q = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long), t], 1)
    fr = _Table(z.unsqueeze(0))
    T = fit_temperatures(fr, q)
    grid = torch.exp(torch.linspace(-5, 5, 4001, dtype=torch.float64))
    ce = torch.stack([F.cross_entropy(z.double() / s, t) for s in grid])
    assert float(T[0]) == pytest.approx(float(grid[ce.argmin()]), rel=0.01)
    assert float(teacher_ce(fr, q, T)[0]) <= float(teacher_ce(fr, q)[0])


def test_temperature_newton_matches_bisection_in_fewer_passes():
    """Safeguarded Newton finds the bisection's minimum (a plain 50-step bisection on the exact derivative, float64)
    to float precision, in a few passes over the queries, for a sharp, a calibrated-ish, a flat and a
    confidently-wrong teacher."""
    g = torch.Generator().manual_seed(2)
    n, E = 200, 50
    t = torch.randint(0, E, (n,), generator=g)
    signal = F.one_hot(t, E).float()
    wrong = F.one_hot((t + 1) % E, E).float() * (torch.arange(n) < 20).float().unsqueeze(1)
    z = torch.stack([20 * signal + 6 * torch.randn(n, E, generator=g), 3 * signal + torch.randn(n, E, generator=g),
                     0.3 * signal + 0.15 * torch.randn(n, E, generator=g),
                     10 * signal + 40 * wrong + 4 * torch.randn(n, E, generator=g)])
    q = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long), t], 1)

    class Counting(_Table):
        passes = 0

        def score_all(self, head, relation, precision="fp32"):
            if int(head[0]) == 0:
                Counting.passes += 1
            return super().score_all(head, relation, precision)

    T = fit_temperatures(Counting(z), q, batch_size=64)
    assert Counting.passes <= 10  # bisection: 30
    zd = z.double()
    for m in range(len(z)):
        lo, hi = -7.0, 7.0
        for _ in range(50):
            mid = (lo + hi) / 2
            p = torch.softmax(zd[m] * math.exp(mid), -1)
            d = float(((p * zd[m]).sum(-1) - zd[m, torch.arange(n), t]).sum())
            lo, hi = (mid, hi) if d < 0 else (lo, mid)
        assert float(T[m]) == pytest.approx(math.exp(-(lo + hi) / 2), rel=1e-6)


def test_summary_features_match_a_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 11, generator=g) * 3
    f = summary_features(z)
    assert f.shape == (4, 3 * 3 + 6)
    le = math.log(11)
    for b in range(4):
        expect = []
        p = [torch.softmax(z[m, b].double(), -1) for m in range(3)]
        expect += [float(-(p[m] * p[m].log()).sum()) / le for m in range(3)]
        expect += [float(p[m].max().log()) / le for m in range(3)]
        expect += [float(z[m, b].sort(descending=True).values[:2].diff().neg()) / le for m in range(3)]
        expect += [float(p[m][int(p[k].argmax())].log()) / le for m in range(3) for k in range(3) if k != m]
        torch.testing.assert_close(f[b].double(), torch.tensor(expect, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_action_ces_and_rewards_by_brute_force():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 9, generator=g) * 2
    t = torch.tensor([0, 3, 8, 1, 1])
    C = subset_matrix(3)
    ces = action_ces(z, C, t)
    for a in range(7):
        for i in range(5):
            mix = sum(float(C[a, m]) * z[m, i] for m in range(3))
            assert float(ces[a, i]) == pytest.approx(float(F.cross_entropy(mix[None], t[i:i + 1])), abs=1e-5)
    s = torch.full((5,), 2.0)
    torch.testing.assert_close(action_rewards(ces, s, "margin"), 2.0 - ces)
    b = action_rewards(ces, s, "binary", 1.0, -10.0)
    assert set(b.unique().tolist()) <= {1.0, -10.0} and bool(((ces < 2.0) == (b == 1.0)).all())


def _selector(cfg: DistillConfig, ds, M=3) -> PolicySelector:
    sel = make_selector("rl", SelectorContext([f"m{i}" for i in range(M)], ds.num_entities, 2 * ds.num_relations,
                                             cfg, torch.Generator().manual_seed(0)))
    assert isinstance(sel, PolicySelector)
    return sel


def test_policy_gradient_only_from_reward_rows_and_expected_baseline_centres_advantages():
    ds = clustered_graph(num_entities=40)
    fr = _frozen(ds)
    cfg = DistillConfig(policy_hidden=16, entropy=0.0, advantage_norm=False)
    sel = _selector(cfg, ds)
    q = torch.from_numpy(ds.queries("train")[:64])
    z = fr.score_all(q[:, 0], q[:, 1])
    rows = torch.zeros(64, dtype=torch.bool)
    out = sel(SelectionBatch(z, q[:, 0], q[:, 1], q[:, 2], student_ce=torch.full((64,), 3.0), reward_rows=rows,
                             generator=torch.Generator().manual_seed(1)))
    out.losses["rc"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in sel.parameters())
    assert out.weights.shape == (64, 3) and torch.allclose(out.weights.sum(1), torch.ones(64))
    # with every row rewarded: the expected baseline makes the mean advantage under pi zero per query
    rows[:] = True
    out = sel(SelectionBatch(z, q[:, 0], q[:, 1], q[:, 2], student_ce=torch.full((64,), 3.0), reward_rows=rows,
                             generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        pi = sel.action_logits(SelectionBatch(z, q[:, 0], q[:, 1], q[:, 2])).softmax(-1)
        r = action_rewards(action_ces(z, sel.subsets, q[:, 2]), torch.full((64,), 3.0), "margin")
    assert float((pi * (r.T - (pi * r.T).sum(-1, keepdim=True))).sum(-1).abs().max()) < 1e-5
    assert float(out.stats["advantage_count"].sum()) == 64
    # the advantage sums per action equal the brute-force advantages of the sampled actions
    a = out.weights.argmax(1)  # not the action id in general; recover it from the weight rows instead
    ids = torch.stack([(sel.subsets == w).all(1).nonzero()[0, 0] for w in out.weights])
    base = (pi * r.T).sum(-1)
    adv = r.T.gather(1, ids[:, None]).squeeze(1) - base
    expect = torch.zeros(7).index_add_(0, ids, adv)
    torch.testing.assert_close(out.stats["advantage_sum"].float(), expect, atol=1e-4, rtol=1e-4)
    del a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_paper_policy_takes_its_gradient_over_the_reward_rows_only(dtype):
    """Under the logits state with an index of reward rows the policy's action logits are computed without autograd for
    every row and with it for the reward rows (``Policy.split_forward``): the same actions, loss and gradients as the
    whole block with autograd, and a backward whose products run over the reward rows only."""
    from torch.utils.flop_counter import FlopCounterMode

    ds = clustered_graph(num_entities=40)
    fr = _frozen(ds)
    cfg = DistillConfig(policy_state="logits", policy_hidden=16)
    q = torch.from_numpy(ds.queries("train")[:64])
    z = fr.score_all(q[:, 0], q[:, 1]).to(dtype)
    rows = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.2
    n = int(rows.sum())
    out = {}
    for split in (False, True):
        sel = _selector(cfg, ds)
        sel.split_rows = split
        res = sel(SelectionBatch(z, q[:, 0], q[:, 1], q[:, 2], student_ce=torch.full((64,), 3.0), reward_rows=rows,
                                 generator=torch.Generator().manual_seed(1)))
        with FlopCounterMode(display=False) as backward:
            res.losses["rc"].backward()
        out[split] = (res, {k: p.grad.clone() for k, p in sel.named_parameters()}, backward.get_total_flops())
    (full, g_full, f_full), (part, g_part, f_part) = out[False], out[True]
    assert torch.equal(full.weights, part.weights)  # the same draws from the same probabilities
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(part.losses["rc"], full.losses["rc"], **tol)
    for k in g_full:
        torch.testing.assert_close(g_part[k], g_full[k], **tol, msg=k)
    assert float(g_full["policy.net.0.weight"].abs().max()) > 0
    S, H, A = 3 * ds.num_entities, 16, 7
    assert f_full == 2 * 64 * S * H + 2 * 64 * H * A + 2 * 64 * A * H  # dW1, dW2 and dh over every row
    assert f_part == 2 * n * S * H + 2 * n * H * A + 2 * n * A * H  # over the reward rows only


def test_the_policy_learns_a_relation_dependent_choice():
    """Teacher m0 is perfect on relation 0 and useless on relation 1, m1 the opposite: the summary policy with a
    relation embedding must learn to pick {m0} on relation 0 and {m1} on relation 1 from margin rewards."""
    torch.manual_seed(0)
    E, B = 20, 200
    cfg = DistillConfig(policy_hidden=32, policy_lr=0.01, entropy=0.0)
    ctx = SelectorContext(["m0", "m1"], E, 2, cfg, torch.Generator().manual_seed(0))
    sel = make_selector("rl", ctx)
    opt = torch.optim.Adam(sel.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(150):
        r = torch.randint(0, 2, (B,), generator=g)
        t = torch.randint(0, E, (B,), generator=g)
        good = F.one_hot(t, E).float() * 8.0
        noise = torch.randn(B, E, generator=g) * 2.0
        z = torch.stack([torch.where(r[:, None] == 0, good, noise), torch.where(r[:, None] == 1, good, noise)])
        out = sel(SelectionBatch(z, t, r, t, student_ce=torch.full((B,), 3.0), generator=g))
        opt.zero_grad()
        out.losses["rc"].backward()
        opt.step()
    with torch.no_grad():
        z = torch.randn(2, 2, E)
        act = sel.greedy(z, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    assert act.tolist() == [0, 1]  # action 0 = {m0}, action 1 = {m1}


def test_every_registered_selector_builds_and_returns_weights_or_logits():
    ds = clustered_graph(num_entities=30)
    fr = _frozen(ds)
    q = torch.from_numpy(ds.queries("train")[:16])
    z = fr.score_all(q[:, 0], q[:, 1])
    for name in [*SELECTORS, "single:m2"]:
        if name == "single":
            continue
        sel = make_selector(name, SelectorContext(fr.modalities, ds.num_entities, 2 * ds.num_relations,
                                                  DistillConfig(policy_hidden=8)))
        out = sel(SelectionBatch(z, q[:, 0], q[:, 1], q[:, 2], student_ce=torch.ones(16),
                                 student_logits=torch.randn(16, ds.num_entities)))
        if out.weights is not None:
            assert out.weights.shape == (16, 3) and torch.allclose(out.weights.sum(1), torch.ones(16))
        else:
            assert out.teacher.shape == (16, ds.num_entities)
    assert make_selector("none", SelectorContext(fr.modalities, 30, 2, DistillConfig())) is None
    with pytest.raises(ValueError, match="single:zz"):
        make_selector("single:zz", SelectorContext(fr.modalities, 30, 2, DistillConfig()))
    with pytest.raises(ValueError, match="not one of"):
        make_selector("bogus", SelectorContext(fr.modalities, 30, 2, DistillConfig()))


def test_presets_paper_and_dsom():
    from dsom.runs.setup import build_config

    paper = build_config("synthetic", preset="paper")
    assert paper.preset == "paper" and paper.distill.policy_state == "logits" and paper.distill.holdout == 0.0
    assert paper.distill.reward == "binary" and paper.distill.baseline == "avg_action"
    assert paper.distill.policy_optimizer == "shared" and not paper.distill.calibrate
    assert paper.distill.policy_hidden == 128  # the dataset preset still applies on top
    dsom = build_config("synthetic")
    assert dsom.preset == "dsom" and dsom.distill.holdout > 0 and dsom.distill.policy_state == "summary"
    over = build_config("synthetic", overrides=[("distill.holdout", 0.2)], preset="paper")
    assert over.distill.holdout == 0.2  # --set wins over the preset
    with pytest.raises(ConfigError):
        build_config("synthetic", preset="nope")
    cfg = Config()
    apply_dict(cfg, METHOD_PRESETS["paper"])
    assert cfg.distill.entropy == 0.0


def test_entity_reliability_by_brute_force():
    from dsom.distill.holdout import entity_reliability

    g = torch.Generator().manual_seed(3)
    n, E, M, R = 60, 12, 2, 3
    table = torch.randn(M, E * R, E, generator=g) * 2  # the teachers' logits of each (entity, relation) pair
    heads = torch.randint(0, E - 2, (n,), generator=g)  # entities E-2 and E-1 never appear
    rels = torch.randint(0, R, (n,), generator=g)
    tails = torch.randint(0, E - 2, (n,), generator=g)
    assert len(torch.unique(heads * R + rels)) < n  # some pairs have several queries

    class Table:
        num_teachers = M

        def __init__(self):
            self.calls: list[int] = []

        def score_all(self, head, relation, precision="fp32"):
            self.calls.append(len(head))
            return table[:, head * R + relation]

    q = torch.stack([heads, rels, tails], 1)
    teachers = Table()
    got = entity_reliability(teachers, q, E, batch_size=7)
    assert sum(teachers.calls) == len(torch.unique(heads * R + rels)) and max(teachers.calls) <= 7  # each pair once
    ce = torch.stack([torch.stack([F.cross_entropy(table[m, int(heads[i] * R + rels[i])][None].double(), tails[i:i + 1])
                                   for i in range(n)]) for m in range(M)], 1)  # (n, M)
    rel_mean = {r: ce[rels == r].mean(0) for r in range(3)}
    centred = torch.stack([ce[i] - rel_mean[int(rels[i])] for i in range(n)])
    raw = torch.zeros(E, M, dtype=torch.float64)
    for e in range(E - 2):
        involved = (heads == e) | (tails == e)
        # a query counts once for its head and once for its tail (twice when both are e)
        w = (heads == e).double() + (tails == e).double()
        if involved.any():
            raw[e] = (w.unsqueeze(1) * centred).sum(0) / w.sum()
    seen = torch.tensor([bool(((heads == e) | (tails == e)).any()) for e in range(E)])
    expect = (raw - raw[seen].mean(0)) / raw[seen].std(0)
    expect[~seen] = 0
    torch.testing.assert_close(got.double(), expect, atol=1e-4, rtol=1e-4)
    assert got[E - 1].abs().sum() == 0


@pytest.mark.slow
def test_pipeline_trains_teachers_without_the_held_out_triples(tmp_path):
    import json

    from dsom.cli import main

    out = tmp_path / "run"
    args = ["run", "-o", str(out), "--rank", "8", "--epochs", "1", "--set", "data.synthetic.num_train=2000",
            "--set", "data.synthetic.num_entities=300", "--set", "ensemble.models=[teacher_avg]",
            "--set", "distill.policy_hidden=8", "--set", "distill.variants=[]", "--set", "distill.holdout=0.2", "-q"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    params = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train_queries"' in x]
    by_stage = {p["stage"]: p["train_queries"] for p in params}
    n_train = res["dataset"]["train"]
    assert by_stage["pretrain"] == 2 * (n_train - round(0.2 * n_train)) and by_stage["distill"] == 2 * n_train
    sel = res["distill"]["selection"]
    assert sel["holdout_triples"] == round(0.2 * n_train) and set(sel["calibration"]) >= {"structure", "text"}
    assert "teacher_avg/calibrated" in res["models"]
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"stage": "distill"' in x and '"epoch"' in x and '"step"' not in x and '"seconds"' in x]
    assert epochs and epochs[0]["reward_queries"] == 2 * round(0.2 * n_train)
    assert "policy_entropy" in epochs[0] and "mean_advantage" in epochs[0]
    # stage 2 alone reuses the teachers' held-out split whatever distill.holdout says
    out2 = tmp_path / "distill"
    assert main(["distill", "-o", str(out2), "--teachers", str(out), "--rank", "8", "--epochs", "1",
                 "--set", "distill.policy_hidden=8", "--set", "distill.holdout=0.5", "-q",
                 "--set", "data.synthetic.num_train=2000", "--set", "data.synthetic.num_entities=300"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["distill"]["selection"]["holdout"] == 0.2


def test_policy_pretraining_moves_the_policy_and_needs_the_margin_reward(tmp_path):
    from dsom.config import set_value
    from dsom.distill.holdout import reward_rows
    from dsom.errors import DsomError
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=50)
    fr = _frozen(ds)
    cfg = Config()
    for k, v in {"model.rank": 8, "train.epochs": 1, "train.batch_size": 100, "train.valid_every": 0,
                 "train.precision": "fp32", "distill.policy_hidden": 8, "distill.policy_pretrain_epochs": 2}.items():
        set_value(cfg, k, v)
    rows = reward_rows(ds, 0.3, 0)
    st = StudentTrainer(ds, cfg, tmp_path / "a", fr, progress=False, reward_rows=rows)
    before = [p.detach().clone() for p in st.model.selector.parameters()]
    st.pretrain_policy()
    assert any(not torch.equal(a, b) for a, b in zip(before, st.model.selector.parameters()))
    assert not any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in st.model.student.parameters())
    set_value(cfg, "distill.reward", "binary")
    st = StudentTrainer(ds, cfg, tmp_path / "b", fr, progress=False, reward_rows=rows)
    with pytest.raises(DsomError, match="margin"):
        st.pretrain_policy()


@pytest.mark.parametrize("baseline", ["avg_action", "batch_mean"])
def test_binary_rewards_ties_and_the_paper_baselines_by_hand(baseline):
    """Eq. 8 with forced actions on hand-made logits: a subset whose CE *equals* the student's is not better (−10),
    the avg_action baseline is the all-teacher reward per query, batch_mean the mean reward of the batch."""
    cfg = DistillConfig(policy_hidden=4, reward="binary", baseline=baseline, advantage_norm=False, entropy=0.0)
    sel = make_selector("rl", SelectorContext(["m0", "m1"], 3, 2, cfg, torch.Generator().manual_seed(0)))
    t0 = torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 0, 4]])
    t1 = torch.tensor([[0.0, 0, 0], [0, 3, 0], [0, 0, 0]])
    z, target = torch.stack([t0, t1]), torch.tensor([0, 1, 2])
    actions = torch.tensor([0, 1, 2])  # {m0}, {m1}, {m0, m1}

    def ce(row, t):  # float64, by hand
        row = row.double()
        return float(torch.log(torch.exp(row).sum()) - row[t])

    student = torch.tensor([0.0, 0.2, 0.5])
    student[0] = float(torch.logsumexp(t0[0], 0) - t0[0, 0])  # query 0: a tie with the chosen teacher m0
    chosen = [ce(t0[0], 0), ce(t1[1], 1), ce((t0[2] + t1[2]) / 2, 2)]
    everyone = [ce((t0[i] + t1[i]) / 2, i) for i in range(3)]
    reward = [-10.0, 1.0 if chosen[1] < 0.2 else -10.0, 1.0 if chosen[2] < 0.5 else -10.0]
    all_reward = [1.0 if e < float(s) else -10.0 for e, s in zip(everyone, student)]
    assert reward == [-10.0, 1.0, 1.0] and all_reward == [-10.0, -10.0, 1.0]  # the two baselines differ
    base = all_reward if baseline == "avg_action" else [sum(reward) / 3] * 3
    forced = torch.full((3, 3), -1e4).scatter_(1, actions[:, None], 1e4)
    sel.action_logits = lambda batch: forced.clone().requires_grad_()
    out = sel(SelectionBatch(z, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), target,
                             student_ce=student, generator=torch.Generator().manual_seed(0)))
    assert out.weights.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert float(out.stats["reward"]) == pytest.approx(sum(reward) / 3)
    assert float(out.stats["reward_baseline"]) == pytest.approx(sum(base) / 3)
    delta = [r - b for r, b in zip(reward, base)]
    torch.testing.assert_close(out.stats["advantage_sum"], torch.tensor(delta))


def test_the_trained_policy_avoids_a_misleading_teacher(tmp_path):
    """End to end through the student trainer with the dsom defaults: teacher ``good`` is a ComplEx fitted on the
    graph, ``liar`` is the same model with its entities shuffled (confidently wrong), ``weak`` is small noise. A
    uniform policy takes ``liar`` in 4 of 7 actions; the trained policy must almost never take it and must take
    ``good`` almost always."""
    from dsom.distill.actions import subset_matrix
    from dsom.train.loop import ComplExTrainer
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=80)
    cfg = Config()
    apply_dict(cfg, {"model.rank": 8, "train.epochs": 15, "train.batch_size": 200, "train.valid_every": 0,
                     "train.precision": "fp32", "train.seed": 3})
    good = ComplExTrainer(ds, cfg, tmp_path / "good", progress=False)
    good.fit()
    E = ds.num_entities
    table = good.model.entity.detach()
    rel = good.model.relation.detach()
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(0))
    weak = torch.randn(E, table.shape[1], generator=torch.Generator().manual_seed(1)) * 0.01
    frozen = FrozenTeachers(["good", "liar", "weak"], torch.stack([table, table[perm], weak]),
                            torch.stack([rel, rel, rel]))
    apply_dict(cfg, {"train.epochs": 6, "distill.policy_hidden": 32})
    st = StudentTrainer(ds, cfg, tmp_path / "student", frozen, progress=False)
    st.fit()
    q = torch.from_numpy(ds.queries("train"))
    members = subset_matrix(3)[st.model.greedy_actions(q)] > 0  # (n, 3)
    uniform = (subset_matrix(3) > 0).float().mean(0)
    assert float(uniform[1]) == pytest.approx(4 / 7)
    took_liar, took_good = float(members[:, 1].float().mean()), float(members[:, 0].float().mean())
    assert took_liar < 0.1, took_liar
    assert took_good > 0.9, took_good


def test_fused_reward_ces_equal_the_per_action_loop():
    """The reward CEs of every action (compiled, no (A, n, E) block) and of the chosen subset equal the per-action
    loop of policy.action_ces on teacher logits divided by the reward temperature."""
    from dsom.distill.actions import subset_matrix
    from dsom.distill.losses import per_query_ce
    from dsom.distill.policy import action_ces
    from dsom.distill.selectors import (
        AllActionCEs,
        _all_action_ces,
        _all_action_ces_eager,
        _chosen_action_ces,
    )
    from dsom.perf import MaybeCompiled

    g = torch.Generator().manual_seed(0)
    tea = torch.randn(3, 9, 40, generator=g) * 3
    tea[1, 2] -= 300.0  # a teacher far below the others on one row: most of its subsets' terms are floored
    target = torch.randint(0, 40, (9,), generator=g)
    subsets = subset_matrix(3)
    want = action_ces(tea / 4.0, subsets, target)
    ref = torch.stack([torch.logsumexp(z, -1) - z[torch.arange(9), target]  # float64, from the definition
                       for z in torch.einsum("am,mne->ane", subsets.double(), tea.double() / 4.0)])
    torch.testing.assert_close(want.double(), ref, rtol=1e-5, atol=1e-4)
    for fn in (_all_action_ces_eager, _all_action_ces, MaybeCompiled(_all_action_ces, True), AllActionCEs()):
        torch.testing.assert_close(fn(tea, subsets, target, 4.0), want, rtol=1e-5, atol=1e-5)
    strided = torch.randn(9, 3, 40, generator=g).permute(1, 0, 2) * 3  # the (B, M, E) layout of fp32 teacher blocks
    torch.testing.assert_close(AllActionCEs()(strided, subsets, target, 2.0),
                               action_ces(strided / 2.0, subsets, target), rtol=1e-5, atol=1e-5)
    pick = torch.randint(0, len(subsets), (9,), generator=g)
    got = _chosen_action_ces(tea, subsets[pick], target, 4.0)
    torch.testing.assert_close(got[0], want[pick, torch.arange(9)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], per_query_ce((tea / 4.0).mean(0), target), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_summary_features_equal_the_log_softmax_topk_definition(compile):
    """The three-pass summary (max, masked max, one exponential pass) equals the definition through log_softmax and
    topk, eager and compiled, on a block with a huge logit (denormal-range exponentials) and ties at the top."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, 50, generator=g) * 4
    z[0, 0, 7] = 300.0  # one dominant entity: every other exponential underflows
    z[1, 1, [3, 9]] = 20.0  # a tie at the top: margin 0; the first index is the top entity
    f = summary_features(z, compile=compile)
    M, B, E = z.shape
    logp = torch.log_softmax(z.double(), -1)
    le = math.log(E)
    ent = -(logp.exp() * logp).sum(-1) / le
    top = z.double().topk(2, dim=-1)
    idx = z.argmax(-1)
    cross = [logp[m].gather(-1, idx[k].unsqueeze(-1)).squeeze(-1) / le for m in range(M) for k in range(M) if k != m]
    want = torch.cat([ent, logp.amax(-1) / le, (top.values[..., 0] - top.values[..., 1]) / le,
                      torch.stack(cross)]).T
    torch.testing.assert_close(f.double(), want, atol=2e-6, rtol=1e-5)
    assert float(f[1, 3 + 3 + 1]) == 0.0  # the tie's margin


@pytest.mark.parametrize("batching", ["triples", "pairs"])
def test_the_student_reward_ce_is_computed_on_the_reward_rows_only_and_gives_the_full_ce_step(tmp_path, monkeypatch,
                                                                                               batching):
    """The policy's reward reads the student's CE at ``distill.reward_tau`` of the reward rows only, so the distiller
    computes it there (NaN elsewhere): equal to a brute-force cross-entropy on those rows, and a step with it has the
    losses, gradients and statistics of a step handed the CE of every row (the path before)."""
    from dsom.config import set_value
    from dsom.data.pairs import group_pairs
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    cfg = Config()
    for k, v in {"model.rank": 8, "train.batch_size": 64, "train.precision": "fp32", "train.seed": 5,
                 "model.init_scale": 0.3, "distill.selector": "rl", "distill.policy_hidden": 8,
                 "distill.reward_tau": 2.0, "distill.batching": batching}.items():
        set_value(cfg, k, v)
    st = StudentTrainer(ds, cfg, tmp_path, _frozen(ds), progress=False)
    d = st.model
    batch = st.train_queries[:64]
    h, r, t = batch.unbind(1)
    pairs = group_pairs(batch) if batching == "pairs" else None
    qh, qr, rows = pairs if pairs is not None else (h, r, None)
    if pairs is not None:
        assert len(qh) < len(batch)  # the batch repeats pairs
    nb = st._neighbour_mask(batch, batch, pairs=pairs) if pairs is not None else st._neighbour_mask(batch, batch)
    reward = torch.zeros(len(batch), dtype=torch.bool)
    reward[1::3] = True

    logits = torch.randn(len(qh), ds.num_entities, generator=torch.Generator().manual_seed(1)) * 3
    got = d.reward_ce(logits, t, rows, reward)
    per_query = logits if rows is None else logits[rows]
    brute = torch.stack([-(per_query[b] / 2.0).log_softmax(-1)[t[b]] for b in range(len(batch))])
    torch.testing.assert_close(got[reward], brute[reward])
    assert torch.isnan(got[~reward]).all()
    torch.testing.assert_close(d.reward_ce(logits, t, rows, None), brute)

    def step():
        d.zero_grad(set_to_none=True)
        losses, stats = d(batch, nb, precision="fp32", reward_rows=reward, generator=torch.Generator().manual_seed(3),
                          pairs=pairs)
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}, stats)

    (l1, g1, s1) = step()
    monkeypatch.setattr(d, "reward_ce", lambda student, target, rows_, reward_rows_, reward_index_=None: d._scaled_ce(
        student, target, 2.0, rows_))
    (l2, g2, s2) = step()
    assert set(l1) == set(l2) and "rc" in l1 and float(l1["rc"]) != 0.0
    for k in l1:
        torch.testing.assert_close(l1[k], l2[k], rtol=0, atol=0)
    assert set(g1) == set(g2) and any(k.startswith("selector.policy") for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=0)
    for k in ("actions", "delta", "reward", "advantage_sum"):
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0)
