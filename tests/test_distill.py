"""Stage 2: losses against independent computations, the action space, rewards, REINFORCE, the distiller."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsom.config import METHOD_PRESETS, Config, DistillConfig, apply_dict, set_value
from dsom.distill.actions import action_names, num_actions, subset_matrix
from dsom.distill.distiller import Distiller
from dsom.distill.losses import dkd, ndkd, nekd, nnkd, target_mask, vanilla_kd
from dsom.distill.policy import Policy, reinforce_loss, triple_rewards
from dsom.distill.selectors import SelectionBatch
from dsom.models.teachers import FrozenTeachers
from dsom.train.loop import ComplExTrainer
from dsom.train.student import StudentTrainer, planted_agreement

from toy import clustered_graph, random_teachers


def _kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    keep = p > 0
    return float((p[keep] * (np.log(p[keep]) - np.log(q[keep]))).sum())


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def test_dkd_equals_an_independent_tckd_nckd():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(5, 9, generator=g) * 3, torch.randn(5, 9, generator=g) * 3
    t = torch.tensor([0, 3, 8, 2, 2])
    tau = 4.0
    got = dkd(zt, zs, t, tau)
    for i in range(5):
        pt, ps = _softmax(zt[i].numpy() / tau), _softmax(zs[i].numpy() / tau)
        k = int(t[i])
        tckd = _kl([pt[k], 1 - pt[k]], [ps[k], 1 - ps[k]])
        rest = [j for j in range(9) if j != k]
        nckd = _kl(pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum())
        assert math.isclose(float(got[i]), tau**2 * (tckd + nckd), rel_tol=1e-4, abs_tol=1e-6)


def test_ndkd_mean_variant_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(3, 12, generator=g) * 2, torch.randn(3, 12, generator=g) * 2
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, [1, 4, 5]] = True
    mask[1, [0]] = True
    mask[2, :11] = True
    tau = 2.0
    got = ndkd(zt, zs, mask, tau, alpha=0.7, beta=1.3)
    for i in range(3):
        pt, ps = _softmax(zt[i].numpy() / tau), _softmax(zs[i].numpy() / tau)
        n = mask[i].numpy()
        mt, ms = pt[n].mean(), ps[n].mean()
        ne = _kl([mt, 1 - mt], [ms, 1 - ms])
        nn_ = _kl(pt[~n] / pt[~n].sum(), ps[~n] / ps[~n].sum())
        assert math.isclose(float(got[i]), tau**2 * (0.7 * ne + 1.3 * nn_), rel_tol=1e-4, abs_tol=1e-6)


def test_sum_variant_decomposes_vanilla_kd_exactly():
    g = torch.Generator().manual_seed(2)
    zt, zs = torch.randn(4, 10, generator=g) * 3, torch.randn(4, 10, generator=g) * 3
    mask = torch.rand(4, 10, generator=g) < 0.3
    mask[:, 0] = True
    tau = 1.0
    full = vanilla_kd(zt, zs, tau, tau_squared=False)
    binary = nekd(zt, zs, mask, tau, mode="sum")
    pn = (F.softmax(zt / tau, -1) * mask).sum(-1)
    rest = nnkd(zt, zs, mask, tau)
    # the KL within the neighbour set, computed independently (it vanishes when N = {t})
    inside = torch.tensor([_kl(_softmax(zt[i][mask[i]].numpy() / tau), _softmax(zs[i][mask[i]].numpy() / tau))
                           for i in range(4)], dtype=torch.float32)
    torch.testing.assert_close(full, binary + pn * inside + (1 - pn) * rest, rtol=1e-4, atol=1e-6)
    # SPEC §5.6's two-term identity holds for N = {t}
    one = target_mask(torch.tensor([0, 1, 2, 3]), 10)
    pt = (F.softmax(zt / tau, -1) * one).sum(-1)
    torch.testing.assert_close(full, nekd(zt, zs, one, tau, mode="sum") + (1 - pt) * nnkd(zt, zs, one, tau),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["single", "all", "huge", "bf16"])
def test_losses_stay_finite_with_finite_gradients(case):
    g = torch.Generator().manual_seed(3)
    E = 16
    zt = torch.randn(4, E, generator=g)
    zs = torch.randn(4, E, generator=g)
    t = torch.tensor([0, 5, 9, 15])
    mask = target_mask(t, E)
    if case == "all":
        mask[:] = True
    if case == "huge":
        zt, zs = zt * 1e6, zs * 1e6
    if case == "bf16":
        zt, zs = zt.bfloat16().float() * 50, zs.bfloat16().float() * 50
    zs.requires_grad_(True)
    for mode in ("mean", "sum"):
        loss = ndkd(zt, zs, mask, 4.0, mode=mode).sum() + dkd(zt, zs, t).sum() + vanilla_kd(zt, zs).sum()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
        zs.grad = None
    if case == "all":  # no non-neighbours: both binary and renormalised terms are 0
        assert float(ndkd(zt, zs.detach(), mask).abs().max()) < 1e-4


def test_action_space_and_names():
    C = subset_matrix(3)
    assert C.shape == (7, 3) and num_actions(4) == 15
    torch.testing.assert_close(C.sum(1), torch.ones(7))
    assert action_names(["S", "V", "D"]) == ["S", "V", "S+V", "D", "S+D", "V+D", "S+V+D"]
    assert subset_matrix(5).shape == (31, 5)


def test_rewards_and_baseline_on_hand_made_logits():
    target = torch.tensor([0, 1])
    student_ce = torch.tensor([1.0, 0.5])
    # row 0: teacher CE ~0.01 < 1.0 -> +1; row 1: teacher CE large -> -10
    teacher = torch.tensor([[10.0, 0.0, 0.0], [5.0, 0.0, 5.0]])
    r = triple_rewards(teacher, student_ce, target)
    assert r.tolist() == [1.0, -10.0]


def test_reinforce_raises_the_log_probability_of_a_positive_delta_action():
    torch.manual_seed(0)
    pol = Policy(6, 3, hidden=8)
    s = torch.randn(4, 6)
    a = torch.tensor([2, 2, 2, 2])
    before = F.log_softmax(pol(s), -1)[:, 2].mean()
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    loss = reinforce_loss(pol(s), a, torch.full((4,), 11.0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert F.log_softmax(pol(s), -1)[:, 2].mean() > before
    # a negative delta lowers it
    before = F.log_softmax(pol(s), -1)[:, 2].mean()
    loss = reinforce_loss(pol(s), a, torch.full((4,), -11.0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert F.log_softmax(pol(s), -1)[:, 2].mean() < before


def _cfg(**kw):
    cfg = Config()
    base = {"model.rank": 8, "train.epochs": 3, "train.batch_size": 100, "train.valid_every": 0,
            "train.precision": "fp32", "train.seed": 5}
    base.update(kw)
    for k, v in base.items():
        set_value(cfg, k, v)
    return cfg


def _paper() -> DistillConfig:
    """The distill section of ``--preset paper``."""
    cfg = Config()
    apply_dict(cfg, METHOD_PRESETS["paper"])
    return cfg.distill


_frozen = random_teachers


def test_gamma_zero_with_the_full_set_reduces_to_plain_training(tmp_path):
    ds = clustered_graph(num_entities=60)
    plain = ComplExTrainer(ds, _cfg(**{"train.batching": "triples"}), tmp_path / "plain", progress=False)  # as the student
    plain.fit()
    cfg = _cfg(**{"distill.selector": "avg", "distill.gamma": 0.0})
    st = StudentTrainer(ds, cfg, tmp_path / "st", _frozen(ds), progress=False)
    st.fit()
    torch.testing.assert_close(st.model.student.entity, plain.model.entity)
    torch.testing.assert_close(st.model.student.relation, plain.model.relation)


def test_distiller_gradients_are_disjoint_and_teachers_stay_frozen():
    ds = clustered_graph(num_entities=40)
    frozen = _frozen(ds)
    tables = frozen.tables.clone()
    d = Distiller(frozen, 2 * ds.num_relations, 8, _paper(), generator=torch.Generator().manual_seed(0))
    batch = torch.from_numpy(ds.queries("train")[:32])
    losses, stats = d(batch, target_mask(batch[:, 2], ds.num_entities), generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"ce", "reg", "rc", "kd"} and int(stats["actions"].sum()) == 32
    assert float(stats["delta"]) * 32 / 11 == pytest.approx(round(float(stats["delta"]) * 32 / 11), abs=1e-4)
    losses["rc"].backward(retain_graph=True)
    assert d.student.entity.grad is None and all(p.grad is not None for p in d.policy.parameters())
    d.zero_grad(set_to_none=True)
    (losses["ce"] + losses["kd"]).backward()
    assert all(p.grad is None for p in d.policy.parameters()) and d.student.entity.grad is not None
    assert torch.equal(frozen.tables, tables)
    assert not any(p is frozen.tables for p in d.parameters())


def test_delta_is_zero_when_the_sampled_action_is_the_full_set():
    ds = clustered_graph(num_entities=40)
    d = Distiller(_frozen(ds), 2 * ds.num_relations, 8, _paper(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # force the policy to pick the full set
        d.policy.net[2].bias.copy_(torch.tensor([-1e4] * 6 + [1e4]))
    batch = torch.from_numpy(ds.queries("train")[:50])
    _, stats = d(batch, None, generator=torch.Generator().manual_seed(1))
    assert int(stats["actions"][-1]) == 50 and float(stats["delta"]) == 0.0


def _student_after_one_epoch(ds, selector, run_dir, frozen):
    import json

    st = StudentTrainer(ds, _cfg(**{"distill.selector": selector, "train.epochs": 1}), run_dir, frozen, progress=False)
    st.fit()
    epoch = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return st.model.student.entity.detach().clone(), epoch


@pytest.mark.parametrize("selector", ["conf", "best_teacher", "best_strategy", "single:m1", "mulde", "avg"])
def test_every_selector_trains_and_its_teachers_change_the_student(tmp_path, selector):
    """Each selector's KD term is logged and positive, and it moves the student away from the one trained with
    the same seed and no teachers (``none``); ``single:m1`` on three teachers is exactly ``avg`` on m1 alone."""
    ds = clustered_graph(num_entities=50)
    frozen = _frozen(ds)
    plain, plain_epoch = _student_after_one_epoch(ds, "none", tmp_path / "none", frozen)
    assert "loss/kd" not in plain_epoch and math.isfinite(plain_epoch["loss/ce"])
    w, epoch = _student_after_one_epoch(ds, selector, tmp_path / "sel", frozen)
    assert torch.isfinite(w).all() and epoch["loss/kd"] > 0
    assert float((w - plain).abs().max()) > 1e-3
    if selector == "single:m1":
        alone = FrozenTeachers(["m1"], frozen.tables[1:2].clone(), frozen.relations[1:2].clone())
        w1, _ = _student_after_one_epoch(ds, "avg", tmp_path / "alone", alone)
        torch.testing.assert_close(w, w1, rtol=1e-5, atol=1e-6)


def test_heuristic_selectors_against_brute_force():
    ds = clustered_graph(num_entities=30)
    frozen = _frozen(ds)
    batch = torch.from_numpy(ds.queries("train")[:20])
    scores = frozen.score_all(batch[:, 0], batch[:, 1])
    for sel in ("conf", "best_teacher", "best_strategy"):
        d = Distiller(frozen, 2 * ds.num_relations, 4, DistillConfig(selector=sel))
        w = d.selector(SelectionBatch(scores, batch[:, 0], batch[:, 1], batch[:, 2])).weights
        for i in range(20):
            t = int(batch[i, 2])
            if sel == "conf":
                m = int(np.argmax([float(scores[k, i].softmax(-1).max()) for k in range(3)]))
                expect = torch.eye(3)[m]
            elif sel == "best_teacher":
                m = int(np.argmin([float(F.cross_entropy(scores[k, i:i + 1], batch[i:i + 1, 2])) for k in range(3)]))
                expect = torch.eye(3)[m]
            else:
                C = subset_matrix(3)
                ces = [float(F.cross_entropy((C[a] @ scores[:, i]).unsqueeze(0), torch.tensor([t]))) for a in range(7)]
                expect = C[int(np.argmin(ces))]
            torch.testing.assert_close(w[i], expect)


def test_planted_agreement_definition():
    class Truth:
        teachers = ("structure", "text")

        def helpful_subset(self, split, direction):
            return np.array([[True, False], [False, False], [True, True]])

        def misleading_subset(self, split, direction):
            return np.array([[False, True], [False, True], [False, False]])

    # actions: 0 = {structure}, 1 = {text}, 2 = {structure, text}
    out = planted_agreement(np.array([0, 0, 2]), Truth(), ["structure", "text"])
    assert out["planted_agreement"] == 1.0
    out = planted_agreement(np.array([2, 1, 0]), Truth(), ["structure", "text"])
    assert out["planted_agreement"] == 0.0
    assert math.isclose(out["planted_agreement_all_teachers"], 1 / 3)


TINY = ["--rank", "8", "--epochs", "2", "--set", "data.synthetic.num_train=3000", "--set",
        "data.synthetic.num_entities=400", "--set", "ensemble.mi_epochs=1", "--set", "distill.policy_hidden=16",
        "--set", "train.valid_every=1", "-q"]


@pytest.mark.slow
def test_run_on_synthetic_reports_student_policy_and_planted_agreement(tmp_path, capsys):
    import json

    from dsom.cli import main

    out = tmp_path / "run"
    assert main(["run", "-o", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"student", "teacher_avg", "mose_bi", "mose_mi", "teacher/structure", "teacher/image"} <= set(res["models"])
    actions = res["policy"]["actions"]
    assert len(actions) == 15 and "structure+text+numeric+image" in actions
    assert math.isclose(sum(actions.values()), 1.0, abs_tol=1e-4)
    assert 0.0 <= res["policy"]["planted_agreement"] <= res["policy"]["planted_agreement_best_possible"] <= 1.0
    assert res["parameters"]["student"] == 2 * 8 * (400 + 2 * 24)
    assert (out / "report" / "summary.md").exists()
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps and all({"delta", "reward", "reward_baseline"} <= set(s) for s in steps)
    # stage 2 alone on the saved teachers, and the report command
    out2 = tmp_path / "distill"
    assert main(["distill", "-o", str(out2), "--teachers", str(out), "--ablation", "table6", *TINY]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert {"student", "student/single:text", "student/single:structure"} <= set(res2["models"])
    capsys.readouterr()
    assert main(["report", str(out2)]) == 0
    assert "student/single:image" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    pytest.importorskip("matplotlib")
    assert {"reward.png", "losses.png", "actions_per_relation.png"} <= {p.name for p in (out / "report").iterdir()}


class Stop(Exception):
    pass


def test_student_resume_is_bit_identical(tmp_path):
    ds = clustered_graph(num_entities=60)
    cfg = _cfg(**{"train.epochs": 3, "distill.policy_hidden": 8})
    frozen = _frozen(ds)
    ref = StudentTrainer(ds, cfg, tmp_path / "ref", frozen, progress=False)
    ref.fit()

    def hook(epoch, batch):
        if (epoch, batch) == (2, 1):
            raise Stop

    with pytest.raises(Stop):
        StudentTrainer(ds, cfg, tmp_path / "run", frozen, progress=False, batch_hook=hook).fit()
    res = StudentTrainer(ds, cfg, tmp_path / "run", frozen, progress=False)
    res.fit(resume=True)
    for a, b in zip(res.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_missing_study_runs_every_rate(tmp_path):
    import json

    from dsom.cli import main

    out = tmp_path / "miss"
    argv = ["run", "-o", str(out), "--rank", "4", "--epochs", "1", "--set", "data.synthetic.num_train=1500",
            "--set", "data.synthetic.num_entities=300", "--set", "ensemble.models=[teacher_avg]",
            "--set", "distill.policy_hidden=8", "--ablation", "missing", "-q"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["missing_study"]) == ["0.0", "0.2", "0.4", "0.6", "0.8"]
    sub = json.loads((out / "missing-0.8" / "results.json").read_text())
    assert all(sub["features"][m]["present"] <= round(0.2 * 300) for m in ("text", "numeric", "image"))
    assert res["missing_study"]["0.8"]["student"] == sub["models"]["student"]["test"]


def test_separate_adam_policy_optimizer_updates_the_policy(tmp_path):
    ds = clustered_graph(num_entities=50)
    cfg = _cfg(**{"distill.policy_optimizer": "adam", "distill.policy_hidden": 8, "train.epochs": 1})
    st = StudentTrainer(ds, cfg, tmp_path, _frozen(ds), progress=False)
    before = [p.detach().clone() for p in st.model.policy.parameters()]
    assert all(id(p) not in {id(q) for g in st.optimizer.param_groups for q in g["params"]}
               for p in st.model.policy.parameters())
    st.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, st.model.policy.parameters()))
    assert "policy_optimizer" in st.extra_train_state()


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_ndkd_and_vanilla_gradients_match_a_float64_probability_space_reference(mode):
    g = torch.Generator().manual_seed(7)
    B, E, tau = 4, 15, 2.0
    zt = torch.randn(B, E, generator=g, dtype=torch.float64) * 3
    zs = (torch.randn(B, E, generator=g, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.rand(B, E, generator=g) < 0.3
    mask[:, 0] = True
    mask[3, :] = True  # no non-neighbours: only the binary term, and it is 0

    def reference(zs_):
        pt, ps = torch.softmax(zt / tau, -1), torch.softmax(zs_ / tau, -1)
        out = []
        for i in range(B):
            n = mask[i]
            bt, bs = pt[i][n].sum(), ps[i][n].sum()
            if mode == "mean":
                bt, bs = bt / n.sum(), bs / n.sum()
            ne = bt * torch.log(bt / bs) + ((1 - bt) * torch.log((1 - bt) / (1 - bs)) if (1 - bt) > 1e-12 else 0)
            if (~n).any():
                qt, qs = pt[i][~n] / pt[i][~n].sum(), ps[i][~n] / ps[i][~n].sum()
                nn_ = (qt * torch.log(qt / qs)).sum()
            else:
                nn_ = torch.zeros((), dtype=torch.float64)
            out.append(tau**2 * (0.6 * ne + 1.4 * nn_))
        return torch.stack(out)

    w = torch.rand(B, generator=g, dtype=torch.float64)
    (reference(zs) * w).sum().backward()
    ref_grad = zs.grad.clone()
    zs.grad = None
    got = ndkd(zt, zs, mask, tau, alpha=0.6, beta=1.4, mode=mode)
    (got * w).sum().backward()
    torch.testing.assert_close(got, reference(zs.detach()), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(zs.grad, ref_grad, rtol=1e-8, atol=1e-10)
    # vanilla KD: gradient is tau (p_s - p_t) per row
    zs.grad = None
    (vanilla_kd(zt, zs, tau) * w).sum().backward()
    expect = tau * (torch.softmax(zs.detach() / tau, -1) - torch.softmax(zt / tau, -1)) * w[:, None]
    torch.testing.assert_close(zs.grad, expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("kd", "mask_dtype"), [("ndkd", torch.bool), ("ndkd", torch.bfloat16),
                                                ("vanilla", torch.bool)])
def test_compiled_distillation_loss_equals_eager_losses_and_gradients(kd, mask_dtype):
    """The compiled terms (with the float mask: its comparison recomputed in the backward, ``mask_recomputed``) equal
    the eager ones on the bool mask."""
    ds = clustered_graph(num_entities=40)
    results = []
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for compile_ in (False, True):
        d = Distiller(_frozen(ds), 2 * ds.num_relations, 8, DistillConfig(kd=kd),
                      generator=torch.Generator().manual_seed(0), compile=compile_)
        out = []
        for n in (32, 11):  # a second batch size must not break the compiled (dynamic-shape) function
            batch = torch.from_numpy(ds.queries("train")[:n])
            mask = target_mask(batch[:, 2], ds.num_entities)
            mask[:, :3] = True
            mask = mask.to(mask_dtype) if compile_ else mask
            losses, _ = d(batch, mask, generator=torch.Generator().manual_seed(1))
            d.zero_grad(set_to_none=True)
            losses["kd"].backward()
            out.append((losses["kd"].detach(), d.student.entity.grad.clone()))
        if compile_:  # the comparison means nothing if compilation silently fell back to eager
            assert d._step_terms.enabled, "torch.compile fell back to eager"
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
        results.append(out)
    for (k0, g0), (k1, g1) in zip(*results):
        torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-6)  # fp32 cancellation in KL = cross - L_t + L_s
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-8)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    from dsom.perf import MaybeCompiled, compile_enabled

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor: C++ compiler not found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = MaybeCompiled(lambda x: x * 2, True)
    with pytest.warns(UserWarning, match="running eagerly"):
        assert f(torch.tensor(3.0)) == 6.0
    assert not f.enabled and f(torch.tensor(1.0)) == 2.0
    g = MaybeCompiled(lambda x: x["missing"], True)  # a genuine error is not swallowed
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with pytest.raises(KeyError):
        g({})
    assert compile_enabled("auto", "cpu", 1000 * 12842) and not compile_enabled("auto", "cpu", 100 * 1000)
    assert compile_enabled("auto", "cuda", 10) and not compile_enabled("off", "cuda", 10**9)
    with pytest.raises(ValueError):
        compile_enabled("yes", "cpu", 1)


def test_neighbour_mask_from_the_host_copy_equals_the_device_lookup(tmp_path):
    ds = clustered_graph(num_entities=60)
    st = StudentTrainer(ds, _cfg(), tmp_path, _frozen(ds), progress=False)
    batch = st.train_queries[torch.randperm(len(st.train_queries), generator=torch.Generator().manual_seed(0))[:40]]
    device = st._neighbour_mask(batch)
    host = st._neighbour_mask(batch, batch.clone(), host_lookup=True)
    assert torch.equal(device, host) and int(device.sum()) > 40  # neighbours beyond the targets
    assert device.dtype == torch.bfloat16 and set(device.unique().tolist()) == {0.0, 1.0}  # CPU: 0/1 bf16 mask
    for i, (e, r, t) in enumerate(batch.tolist()):
        expect = set(ds.neighbour_index.answers_of(e, r).tolist()) | {t}
        assert set(device[i].nonzero().squeeze(1).tolist()) == expect


def test_kd_registry_matches_the_losses_and_takes_a_new_loss_by_name():
    """Each registered distill.kd is the NDKD/DKD/vanilla call it names; a new loss is one registered function."""
    from dsom.config import DistillConfig
    from dsom.distill import kd as kdmod
    from dsom.distill.distiller import kd_rows
    from dsom.distill.losses import ndkd, target_mask, vanilla_kd

    g = torch.Generator().manual_seed(0)
    B, E = 5, 9
    tea, stu = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    t = torch.tensor([0, 3, 8, 2, 2])
    nb = target_mask(t, E) | (torch.rand(B, E, generator=g) < 0.3)
    cfg = DistillConfig(alpha=0.7, beta=1.3, tau=2.0)
    expect = {
        "ndkd": ndkd(tea, stu, nb, 2.0, 0.7, 1.3, cfg.neighbour_mode, cfg.tau_squared),
        "nekd": ndkd(tea, stu, nb, 2.0, 0.7, 0.0, cfg.neighbour_mode, cfg.tau_squared),
        "nnkd": ndkd(tea, stu, nb, 2.0, 0.0, 1.3, cfg.neighbour_mode, cfg.tau_squared),
        "dkd": ndkd(tea, stu, target_mask(t, E), 2.0, 0.7, 1.3, cfg.neighbour_mode, cfg.tau_squared),
        "vanilla": vanilla_kd(tea, stu, 2.0, cfg.tau_squared),
    }
    assert set(kdmod.KD_LOSSES) == set(expect)
    for name, want in expect.items():
        torch.testing.assert_close(kd_rows(tea, stu, t, nb, cfg, name), want)
        # the 0/1 bfloat16 mask the CPU trainer builds (NEIGHBOUR_MASK_DTYPE) means the same set
        torch.testing.assert_close(kd_rows(tea, stu, t, nb.to(torch.bfloat16), cfg, name), want)
    assert {n for n, k in kdmod.KD_LOSSES.items() if k.needs_neighbours} == {"ndkd", "nekd", "nnkd"}
    # without a neighbour mask the target alone is the neighbour set
    torch.testing.assert_close(kd_rows(tea, stu, t, None, cfg, "ndkd"), expect["dkd"])
    with pytest.raises(ValueError, match="distill.kd='bogus' is not one of ndkd, .*none"):
        kdmod.check_kd("bogus")
    try:
        kdmod.register_kd("l2")(lambda te, st, tg, n, c: (te - st).pow(2).mean(-1))
        torch.testing.assert_close(kd_rows(tea, stu, t, None, cfg, "l2"), (tea - stu).pow(2).mean(-1))
    finally:
        kdmod.KD_LOSSES.pop("l2", None)
