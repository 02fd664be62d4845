"""train.cuda_graphs (issue 12): the training step captured once and replayed trains the same model as eager steps.

Without CUDA the capture is stood in for by re-running the captured step (``rerun_capture``), which still reads the
batch from the graph's fixed index buffer and runs the optimizer through :class:`DeviceAdagradStep` (learning rates
in device scalars, step counters advanced after each replay): what these tests check against plain eager training and
torch's Adagrad. The CUDA test runs the real capture where there is a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsom.data.modality import ModalityTable
from dsom.errors import DsomError
from dsom.models.fused import _add_rows
from dsom.train.graphs import rerun_capture
from dsom.train.loop import ComplExTrainer
from dsom.train.optim import DeviceAdagradStep, ShadowAdagrad
from dsom.train.teachers import TeacherTrainer

from toy import clustered_graph, config

# 90 entities: 3 x 90 x 6 x ... training queries, not a multiple of 64, so every epoch ends with a short batch
_BASE = {"model.rank": 8, "train.epochs": 3, "train.batch_size": 64, "train.valid_every": 0, "train.batching": "triples",
         "train.seed": 3, "model.init_scale": 0.3, "train.compile": "off", "train.precision": "fp32"}


def _features(ds):
    rng = np.random.default_rng(1)
    return {"text": ModalityTable("text", rng.standard_normal((ds.num_entities, 5)).astype(np.float32),
                                  np.ones(ds.num_entities, bool))}


def _train(kind, ds, tmp_path, name, capture=rerun_capture, **kw):
    cfg = config(_BASE, **kw)
    if kind == "complex":
        tr = ComplExTrainer(ds, cfg, tmp_path / name, progress=False, batch_hook=_halve_lr)
    else:
        cfg.modalities = ["structure", "text"]
        tr = TeacherTrainer(ds, cfg, tmp_path / name, _features(ds), progress=False, batch_hook=_halve_lr)
    tr.graph_capture = capture
    _halve_lr.trainer = tr
    tr.fit()
    return tr


def _halve_lr(epoch, batch):
    """A learning-rate change in the middle of training (as the plateau scheduler makes), after the capture."""
    if (epoch, batch) == (2, 1):
        for g in _halve_lr.trainer.optimizer.param_groups:
            g["lr"] /= 2


@pytest.mark.parametrize("kind", ["complex", "teachers"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_equals_eager_training(tmp_path, kind, precision):
    ds = clustered_graph(num_entities=90)
    n = len(ds.queries("train"))
    assert n % 64, "the test needs a short last batch"
    eager = _train(kind, ds, tmp_path, "eager", **{"train.cuda_graphs": "off", "train.precision": precision})
    graphed = _train(kind, ds, tmp_path, "graphed", **{"train.cuda_graphs": "on", "train.precision": precision})
    assert eager.graph_step() is None
    g = graphed.graph_step()
    full = n // 64
    assert g.failed is None and g.eager_steps == g.warmup and g.replays == 3 * full - g.warmup
    if precision == "bf16":
        assert isinstance(graphed.optimizer, ShadowAdagrad)
    pe, pg = dict(eager.model.named_parameters()), dict(graphed.model.named_parameters())
    assert pe.keys() == pg.keys()
    for k in pe:
        assert not torch.equal(pg[k], graphed.build_model(torch.Generator().manual_seed(3)).state_dict()[k])
        # fp32: the two updates round differently (torch's fused CPU Adagrad against one element-wise pass), by under
        # 1e-6 after 3 epochs; bf16 products amplify that to about 3e-4 (one ulp of a cast operand flips)
        tol = 2e-6 if precision == "fp32" else 1e-3
        torch.testing.assert_close(pg[k], pe[k], rtol=0, atol=tol, msg=k)
        se, sg = eager.optimizer.state[pe[k]], graphed.optimizer.state[pg[k]]
        assert float(sg["step"]) == float(se["step"]) == 3 * (full + 1)
        torch.testing.assert_close(sg["sum"], se["sum"], rtol=2e-2 if precision == "bf16" else 2e-5, atol=1e-4 if precision == "bf16" else 2e-6)
    assert graphed.optimizer.param_groups[0]["lr"] == eager.optimizer.param_groups[0]["lr"] == 0.05


def test_a_failed_capture_is_reported_and_training_goes_on_eagerly(tmp_path, caplog):
    ds = clustered_graph(num_entities=90)

    def broken(fn, generators=()):
        raise RuntimeError("operation not permitted when stream is capturing")

    eager = _train("complex", ds, tmp_path, "eager", **{"train.cuda_graphs": "off"})
    with caplog.at_level("WARNING", logger="dsom"):
        tr = _train("complex", ds, tmp_path, "broken", capture=broken, **{"train.cuda_graphs": "auto"})
    g = tr.graph_step()
    assert g.replays == 0 and "operation not permitted" in g.failed
    assert "could not be captured as a CUDA graph" in caplog.text
    torch.testing.assert_close(tr.model.entity, eager.model.entity, rtol=2e-5, atol=2e-6)
    with pytest.raises(RuntimeError, match="not permitted"):
        _train("complex", ds, tmp_path, "broken-on", capture=broken, **{"train.cuda_graphs": "on"})


@pytest.mark.parametrize("setting,problem", [
    ({"train.batching": "pairs"}, "batching=pairs"),
    ({"train.optimizer": "adam"}, "adam"),
    ({"train.block_mb": 1e-3}, "entity chunks"),
])
def test_cuda_graphs_on_where_the_step_cannot_be_captured_is_an_error(tmp_path, setting, problem):
    ds = clustered_graph(num_entities=60)
    tr = ComplExTrainer(ds, config(_BASE, **{"train.cuda_graphs": "on", **setting}), tmp_path / "on", progress=False)
    tr.graph_capture = rerun_capture
    with pytest.raises(DsomError, match=problem):
        tr.graph_step()
    auto = ComplExTrainer(ds, config(_BASE, **setting), tmp_path / "auto", progress=False)
    auto.graph_capture = rerun_capture
    assert auto.graph_step() is None


def test_auto_on_a_cpu_trains_without_graphs_and_on_is_an_error(tmp_path):
    ds = clustered_graph(num_entities=60)
    tr = ComplExTrainer(ds, config(_BASE), tmp_path / "auto", progress=False)
    assert tr.device.type == "cpu" and tr.graph_step() is None and tr.device_update() is None
    on = ComplExTrainer(ds, config(_BASE, **{"train.cuda_graphs": "on"}), tmp_path / "on", progress=False)
    with pytest.raises(DsomError, match="not cuda"):
        on.graph_step()


@pytest.mark.parametrize("shadow", [False, True])
def test_device_adagrad_step_equals_torch_adagrad_through_lr_changes_and_decay(shadow):
    gen = torch.Generator().manual_seed(0)
    big = (1 << 20) + 8 if shadow else 40  # ShadowAdagrad shadows tables of 2^20 elements or more
    init = [torch.randn(big, generator=gen), torch.randn(7, 3, generator=gen)]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    torch_opt = torch.optim.Adagrad(ref, lr=0.1, lr_decay=0.01)
    opt = (ShadowAdagrad(ours, lr=0.1, compile=False) if shadow else torch.optim.Adagrad(ours, lr=0.1, lr_decay=0.01))
    step = DeviceAdagradStep(opt, compile=False)
    for i in range(5):
        grads = [torch.randn(x.shape, generator=gen) for x in init]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        if i == 3:
            for o in (torch_opt, opt):
                o.param_groups[0]["lr"] = 0.03
        if shadow:  # ShadowAdagrad has no lr_decay argument: compare with the same setting
            torch_opt.param_groups[0]["lr_decay"] = opt.param_groups[0]["lr_decay"] = 0.0
        torch_opt.step()
        step.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert float(opt.state[a]["step"]) == float(torch_opt.state[b]["step"]) == 5
        torch.testing.assert_close(opt.state[a]["sum"], torch_opt.state[b]["sum"])
    if shadow:
        from dsom.models.products import bf16_shadow

        assert torch.equal(bf16_shadow(ours[0]), ours[0].detach().to(torch.bfloat16))


def test_device_adagrad_step_refuses_what_it_cannot_run():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="adam"):
        DeviceAdagradStep(torch.optim.Adam([p]), compile=False)
    with pytest.raises(ValueError, match="weight decay"):
        DeviceAdagradStep(torch.optim.Adagrad([p], weight_decay=0.1), compile=False)


def test_dense_bf16_row_additions_equal_the_per_id_path_and_float64():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 6, generator=gen).to(torch.bfloat16)
    index = torch.tensor([3, 7, 3, 49, 0, 3, 7])
    rows = torch.randn(len(index), 6, generator=gen)
    expected = table.double().index_add(0, index, rows.double()).to(torch.bfloat16)  # each row rounded once
    per_id, dense = table.clone(), table.clone()
    _add_rows(per_id, index, rows, dense=False)
    _add_rows(dense, index, rows, dense=True)
    assert torch.equal(dense, per_id)
    assert torch.equal(dense, expected)
    assert not torch.equal(dense, table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["complex", "teachers"])
def test_captured_cuda_graph_trains_as_eager_steps(tmp_path, kind):
    from dsom.train.graphs import cuda_capture

    ds = clustered_graph(num_entities=90)
    # eager loss tails here (compiling them takes minutes at these many small shapes); benchmarks/cuda_graphs.py
    # compares the compiled ones on DB15K
    kw = {"train.device": "cuda", "train.precision": "bf16", "train.compile": "off"}
    eager = _train(kind, ds, tmp_path, "eager", capture=cuda_capture, **{"train.cuda_graphs": "off", **kw})
    graphed = _train(kind, ds, tmp_path, "graphed", capture=cuda_capture, **{"train.cuda_graphs": "on", **kw})
    g = graphed.graph_step()
    assert g.failed is None and g.replays > 0
    assert eager.device_update() is not None  # eager CUDA steps run the update the graph captures: the same kernels
    for (k, a), b in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", ["complex", "teachers"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_gpu_step_has_no_op_whose_result_the_host_must_read(tmp_path, kind, precision):
    """What a CUDA graph cannot hold, and what makes a GPU step wait for the device: an op whose output size or value
    the host needs (``nonzero``, ``unique``, ``item``, boolean-mask indexing). On ``meta`` tensors (shapes, no values)
    every such op raises, and the step takes its non-CPU code path (the dense bf16 row additions, the ``(P, E)``
    layout): the step, its backward and the device update run there without one."""
    ds = clustered_graph(num_entities=90)
    cfg = config(_BASE, **{"train.precision": precision})
    if kind == "complex":
        tr = ComplExTrainer(ds, cfg, tmp_path, progress=False)
    else:
        cfg.modalities = ["structure", "text"]
        tr = TeacherTrainer(ds, cfg, tmp_path, _features(ds), progress=False)
    tr.model.to_empty(device="meta")
    tr.train_queries = torch.zeros(tr.train_queries.shape, dtype=torch.int64, device="meta")
    params = list(tr.model.parameters())
    opt = ShadowAdagrad(params, lr=0.1, compile=False) if precision == "bf16" else torch.optim.Adagrad(params, lr=0.1)
    update = DeviceAdagradStep(opt, compile=False)
    with pytest.raises(NotImplementedError):  # the probe works: a data-dependent op does raise on meta
        torch.zeros(3, device="meta").nonzero()
    step = tr.loss(tr.train_queries[torch.arange(64, device="meta")])
    step.total.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in params)
    update.prepare()
    update.apply()


@pytest.mark.parametrize("selector", ["rl", "single:text", "avg"])
def test_stage_two_gpu_paths_give_the_cpu_paths_losses_and_gradients(tmp_path, monkeypatch, selector):
    """Off a CPU, stage 2 reads nothing of the device's data on the host (``perf.device_is_host``): the rewarded rows
    are read as a mask over the whole batch (no gather of a data-dependent number of rows), the neighbour pairs come
    from the host's CSR, and every teacher is scored on every row instead of only where the chosen weights are
    non-zero. Run on a CPU by pretending it is not the host,
    these paths give the CPU paths' losses and gradients."""
    from dsom import perf
    from dsom.models.teachers import FrozenTeachers
    from dsom.train.student import StudentTrainer

    ds = clustered_graph(num_entities=40)
    g = torch.Generator().manual_seed(0)
    frozen = FrozenTeachers(["structure", "text"], torch.randn(2, ds.num_entities, 16, generator=g),
                            torch.randn(2, 2 * ds.num_relations, 16, generator=g))
    n = len(ds.queries("train"))
    rewarded = torch.rand(n, generator=g) < 0.3
    cfg = config(_BASE, **{"distill.selector": selector, "distill.policy_hidden": 8, "train.batch_size": 64})
    st = StudentTrainer(ds, cfg, tmp_path, frozen, progress=False, reward_rows=rewarded)
    order, offsets = st.epoch_batches(1)
    sl = slice(offsets[0], offsets[1])
    st.current_epoch, st.current_batch = 1, 0
    st.current_batch_cpu, st.current_batch_index_cpu = st.train_queries_cpu[order[sl]], order[sl]
    st.current_batch_index = order[sl].to(st.device)
    assert bool(rewarded[order[sl]].any()) and not bool(rewarded[order[sl]].all())
    out = {}
    for host in (True, False):
        monkeypatch.setattr(perf, "device_is_host", lambda device, host=host: host)
        assert st._reward_index(st.device, False) is None  # (one process: off a CPU the rows are read as a mask)
        st.model.zero_grad(set_to_none=True)
        step = st.loss(st.train_queries[st.current_batch_index])
        step.total.backward()
        out[host] = ({k: v.detach() for k, v in step.terms.items()},
                     {k: p.grad.clone() for k, p in st.model.named_parameters() if p.grad is not None},
                     {k: v.detach().clone() for k, v in st.step_outputs.items()})
    (l_cpu, g_cpu, s_cpu), (l_gpu, g_gpu, s_gpu) = out[True], out[False]
    # the policy's statistics over the reward rows (their sums and means) too
    assert s_cpu.keys() == s_gpu.keys() and ("advantage_sum" in s_cpu) == (selector == "rl")
    for k in s_cpu:
        torch.testing.assert_close(s_gpu[k].to(s_cpu[k].dtype), s_cpu[k], rtol=1e-5, atol=1e-6, msg=k)
    assert l_cpu.keys() == l_gpu.keys() and "kd" in l_cpu and ("rc" in l_cpu) == (selector == "rl")
    for k in l_cpu:
        torch.testing.assert_close(l_gpu[k], l_cpu[k], rtol=1e-6, atol=1e-7, msg=k)
    assert g_cpu.keys() == g_gpu.keys() and g_cpu
    for k in g_cpu:
        torch.testing.assert_close(g_gpu[k], g_cpu[k], rtol=1e-5, atol=1e-7, msg=k)


def test_off_diagonal_equals_the_boolean_mask_it_replaces():
    from dsom.distill.policy import off_diagonal

    for M in (1, 2, 3, 5):
        x = torch.randn(M, M, 7)
        assert torch.equal(off_diagonal(x), x[~torch.eye(M, dtype=torch.bool)]), M


def _frozen(ds):
    from dsom.models.teachers import FrozenTeachers

    g = torch.Generator().manual_seed(0)
    return FrozenTeachers(["structure", "text"], torch.randn(2, ds.num_entities, 16, generator=g),
                          torch.randn(2, 2 * ds.num_relations, 16, generator=g))


def _student(ds, tmp_path, name, capture=rerun_capture, shrink=False, reward_share=0.3, **kw):
    """Stage 2 on ``ds`` with random teachers and a third of the rows rewarded, its learning rate halved in epoch 2;
    ``shrink``: the neighbour pairs' capacity of a graph cut below a batch's in epoch 2 (as a batch with more pairs than
    any before would find it)."""
    from dsom.train.student import StudentTrainer

    n = len(ds.queries("train"))
    rewarded = torch.rand(n, generator=torch.Generator().manual_seed(5)) < reward_share
    cfg = config(_BASE, **{"distill.policy_hidden": 8, "train.batch_size": 64, **kw})

    def hook(epoch, batch):
        _halve_lr(epoch, batch)
        if shrink and (epoch, batch) == (2, 3):
            st._pair_capacity = 64  # (a batch here has about 200)

    st = StudentTrainer(ds, cfg, tmp_path / name, _frozen(ds), progress=False, reward_rows=rewarded, batch_hook=hook)
    st.graph_capture = capture
    _halve_lr.trainer = st
    st.fit()
    return st


def _epoch_records(st):
    import json

    lines = (st.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == st.stage and "step" not in r and "epoch" in r]


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("setting,captures", [
    ({}, 2),  # dsom's defaults (the summary policy, its state and reward caches, held-out rewards): sealed in epoch 2
    ({"distill.kd_warmup_epochs": 2, "distill.baseline": "batch_mean", "distill.policy_state": "logits"}, 2),
    ({"distill.selector": "avg"}, 1),  # (no policy, no cache: one capture for the whole run)
    ({"distill.selector": "avg", "shrink": True}, 2),  # a batch with more pairs than the capacity: captured again
])
def test_graphed_stage_two_trains_as_eager_steps(tmp_path, monkeypatch, host, setting, captures):
    """Stage 2 as a graph: the policy's draws from the generator re-seeded before each replay, the neighbour pairs
    built in fixed-size tensors on the device, the policy's Adam inside the step, a new capture when a cache seals, the
    KD warm-up's weight changes or a batch has more neighbour pairs than the capacity. Off a CPU (``host=False``,
    pretended) the reward rows are a mask and every teacher is scored."""
    from dsom import perf

    monkeypatch.setattr(perf, "device_is_host", lambda device: host)
    setting = dict(setting)
    shrink = setting.pop("shrink", False)
    ds = clustered_graph(num_entities=40)
    n = len(ds.queries("train"))
    assert n % 64 and n // 64 >= 4
    eager = _student(ds, tmp_path, "eager", **{"train.cuda_graphs": "off", **setting})
    graphed = _student(ds, tmp_path, "graphed", shrink=shrink, **{"train.cuda_graphs": "on", **setting})
    g = graphed.graph_step()
    assert eager.graph_step() is None and g.failed is None
    assert g.captures == captures and g.replays == 3 * (n // 64) - g.warmup * g.captures
    # released after training (its memory pool goes back): no graph, no gradient, no step outputs left
    assert g.replay is None and not graphed.step_outputs and all(p.grad is None for p in graphed.model.parameters())
    assert graphed._pair_capacity >= 64  # (the pairs of every batch fitted: a short one would have grown it)
    pe, pg = dict(eager.model.named_parameters()), dict(graphed.model.named_parameters())
    assert pe.keys() == pg.keys()
    for k in pe:
        torch.testing.assert_close(pg[k], pe[k], rtol=0, atol=2e-5, msg=k)
    re, rg = _epoch_records(eager), _epoch_records(graphed)
    assert len(re) == len(rg) == 3
    policy = "distill.selector" not in setting
    for a, b in zip(re, rg):
        assert ("actions" in a) == policy and a.get("actions") == b.get("actions")
        assert a.get("reward_queries") == b.get("reward_queries")
        for k in ("loss/ce", "loss/kd", "loss/rc"):
            assert (k in a) == (k != "loss/rc" or policy)
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_stage_two_trains_as_eager_cuda_steps(tmp_path):
    """The real capture of stage 2 (the policy's generator registered with the graph and re-seeded before each replay,
    the policy's capturable Adam inside it, a second graph once the caches seal): the same model as eager CUDA steps,
    which run the same kernels."""
    from dsom.train.graphs import cuda_capture

    ds = clustered_graph(num_entities=40)
    kw = {"train.device": "cuda", "train.precision": "bf16", "train.compile": "off"}
    eager = _student(ds, tmp_path, "eager", capture=cuda_capture, **{"train.cuda_graphs": "off", **kw})
    graphed = _student(ds, tmp_path, "graphed", capture=cuda_capture, **{"train.cuda_graphs": "on", **kw})
    g = graphed.graph_step()
    assert g.failed is None and g.captures == 2 and g.replays > 0
    for (k, a), b in zip(graphed.model.named_parameters(), eager.model.parameters()):
        assert torch.equal(a, b), k
    assert [r.get("actions") for r in _epoch_records(graphed)] == [r.get("actions") for r in _epoch_records(eager)]


def test_the_masked_reward_rows_log_the_steps_the_gathered_ones_do(tmp_path, monkeypatch):
    """Off a CPU a batch without a reward row is not skipped (the mask is not read on the host): it must not log a step
    either. With 2% of the queries rewarded some batches have none; both ways log the same steps and values."""
    import json

    from dsom import perf

    ds = clustered_graph(num_entities=40)
    steps = {}
    for host in (True, False):
        monkeypatch.setattr(perf, "device_is_host", lambda device, host=host: host)
        st = _student(ds, tmp_path, f"host-{host}", reward_share=0.02, **{"train.cuda_graphs": "off"})
        lines = (st.run_dir / "metrics.jsonl").read_text().splitlines()
        steps[host] = [r for r in map(json.loads, lines) if "step" in r and "delta" in r]
    batches = 3 * -(-len(ds.queries("train")) // 64)
    assert 0 < len(steps[True]) < batches  # some batches had no reward row
    assert [(r["epoch"], r["step"]) for r in steps[True]] == [(r["epoch"], r["step"]) for r in steps[False]]
    for a, b in zip(steps[True], steps[False]):
        for k in ("delta", "reward", "reward_baseline"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
