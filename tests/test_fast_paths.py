import pytest
import torch
import torch.nn.functional as F

from dsom.models.chunked import chunked_cross_entropy, entity_chunk


def _reference(q, table, t):
    return F.cross_entropy((q @ table.transpose(-1, -2)).reshape(-1, table.shape[-2]),
                           t.repeat(q.numel() // q.shape[-1] // len(t)), reduction="none").view(q.shape[:-1])


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_chunked_ce_matches_full_cross_entropy_values_and_gradients(lead, chunk):
    g = torch.Generator().manual_seed(0)
    E, B, D = 40, 9, 6
    q = (torch.randn(*lead, B, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    table = (torch.randn(*lead, E, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 39, 5, 5, 12, 7, 39, 1, 20])  # repeated targets exercise the index_add
    w = torch.rand(*lead, B, generator=g, dtype=torch.float64)  # a non-uniform incoming gradient
    ref = _reference(q, table, t)
    (ref * w).sum().backward()
    gq, gt = q.grad.clone(), table.grad.clone()
    q.grad = table.grad = None
    out = chunked_cross_entropy(q, table, t, chunk)
    (out * w).sum().backward()
    # the chunked path computes in float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad, gq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table.grad, gt, rtol=1e-4, atol=1e-5)


def test_chunked_ce_gradcheck_in_double_free_of_float32_rounding():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, 3, 3])
    # float32 internals: compare the analytical gradient with finite differences at a loose tolerance
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, t, 4), (q, table), eps=1e-3,
                                    atol=2e-3, rtol=2e-3)


def test_chunked_ce_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    q, table = torch.randn(16, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    t = torch.randint(0, 300, (16,), generator=g)
    a = chunked_cross_entropy(q, table, t, 64, "bf16")
    b = F.cross_entropy(q @ table.T, t, reduction="none")
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.05)
    assert not torch.equal(a, b)  # it really multiplied in bf16


def test_chunked_ce_never_allocates_a_full_block():
    """Every tensor any ATen op produces, forward and backward, saved for backward or a temporary, is watched
    through a dispatch mode: none may be as large as a B x E logit block (4 MB here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    E, B, D, chunk = 20000, 50, 8, 100
    sizes: list[tuple[int, str]] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    sizes.append((x.numel(), str(func)))
            return out

    q = torch.randn(B, D, requires_grad=True)
    table = torch.randn(E, D, requires_grad=True)
    t = torch.randint(0, E, (B,))
    with Watch():
        chunked_cross_entropy(q, table, t, chunk).mean().backward()
    largest, op = max(sizes)
    assert len(sizes) > 20  # the mode saw the chunk loop, forward and backward
    assert largest <= E * D, f"{op} produced {largest} elements"  # the table's gradient is the largest tensor
    assert B * E > E * D
    with Watch():  # the watch itself catches a full block
        (q @ table.T).logsumexp(-1).sum().backward()
    assert max(sizes)[0] >= B * E


def test_entity_chunk_sizes():
    assert entity_chunk(1000, 12842, 512) == 12842  # DB15K fits in one block
    assert entity_chunk(1000, 1_000_000, 256) == 67108
    assert entity_chunk(1000, 1_000_000, 0) == 1_000_000
    assert entity_chunk(10**9, 50, 1) == 1
    with pytest.raises(ValueError):
        chunked_cross_entropy(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0)


def _grads(trainer, batch):
    loss = trainer.loss(batch).total
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["complex", "teachers"])
def test_trainers_give_the_same_loss_and_gradients_with_entity_chunks(tmp_path, kind):
    import numpy as np

    from dsom.config import Config, set_value
    from dsom.data.modality import ModalityTable
    from dsom.train.loop import ComplExTrainer
    from dsom.train.teachers import TeacherTrainer

    from toy import random_graph

    ds = random_graph(num_entities=60)
    results = []
    for block_mb in (0.0, 17 * 4 * 50 / 2**20):  # 17 entities per chunk for 50 queries: 4 chunks
        assert entity_chunk(50, 60, block_mb) == (60 if block_mb == 0 else 17)
        cfg = Config()
        for k, v in {"model.rank": 6, "train.precision": "fp32", "train.block_mb": block_mb,
                     "modalities": ["structure", "text"]}.items():
            set_value(cfg, k, v)
        if kind == "complex":
            tr = ComplExTrainer(ds, cfg, tmp_path, progress=False)
        else:
            rng = np.random.default_rng(0)
            feats = {"text": ModalityTable("text", rng.normal(size=(60, 5)).astype(np.float32), np.ones(60, bool))}
            tr = TeacherTrainer(ds, cfg, tmp_path, feats, progress=False)
        results.append(_grads(tr, torch.from_numpy(ds.queries("train")[:50])))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) >= 2
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7)


def test_bf16sim_reproduces_bf16_products_forward_and_backward():
    from dsom.models.products import matmul_scores

    out = {}
    for prec in ("bf16", "bf16sim", "fp32"):
        q = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(4)).requires_grad_()
        c = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        s = matmul_scores(q, c, prec)
        w = torch.randn(s.shape, generator=torch.Generator().manual_seed(6))
        (s * w).sum().backward()
        out[prec] = (s.detach(), q.grad, c.grad)
    for a, b, f in zip(out["bf16"], out["bf16sim"], out["fp32"]):
        # one bf16 step (2^-8 relative) at most, from a different fp32 accumulation order
        assert ((a - b).abs() <= a.abs() * 2**-7 + 1e-6).all()
        assert (a - b).abs().max() <= (a - f).abs().max()  # much closer to bf16 than fp32 is
        assert not torch.equal(b, f)


def test_stacked_scores_loop_equals_batched_product_and_keeps_gradients():
    from dsom.models.products import stacked_scores

    g = torch.Generator().manual_seed(8)
    q, c = torch.randn(3, 7, 10, generator=g), torch.randn(3, 13, 10, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(stacked_scores(q, c), torch.bmm(q, c.transpose(1, 2)))
    qg = q.clone().requires_grad_()
    out = stacked_scores(qg, c)
    out.sum().backward()
    torch.testing.assert_close(qg.grad, c.sum(1, keepdim=True).expand(3, 7, 10))


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_fused_optimizer_matches_the_reference_update(name):
    from dsom.config import Config, set_value
    from dsom.train.loop import make_optimizer

    cfg = Config()
    set_value(cfg, "train.optimizer", name)
    g = torch.Generator().manual_seed(9)
    a = torch.nn.Parameter(torch.randn(30, 8, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    fused = make_optimizer([a], cfg)
    assert fused.defaults["fused"] is True
    ref = (torch.optim.Adagrad if name == "adagrad" else torch.optim.Adam)([b], lr=cfg.train.lr)
    for _ in range(10):
        grad = torch.randn(30, 8, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        ref.step()
    assert not torch.equal(a, torch.zeros_like(a))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_teacher_scores_make_the_policy_state_without_a_copy():
    from dsom.distill.policy import policy_state
    from dsom.models.products import stacked_scores

    g = torch.Generator().manual_seed(10)
    q, c = torch.randn(3, 5, 4, generator=g), torch.randn(3, 9, 4, generator=g)
    with torch.no_grad():
        s = stacked_scores(q, c)
    state = policy_state(s)
    assert state.data_ptr() == s.data_ptr()  # a view
    torch.testing.assert_close(state, torch.cat([s[m] for m in range(3)], dim=1))


def test_compile_cache_is_kept_apart_per_vector_isa(tmp_path):
    """torch's FX-graph cache key omits the vector ISA: a graph generated for AVX2 and loaded on an AVX-512 CPU writes
    past its buffers. dsom gives each ISA its own inductor folder, inside the user's folder where they named one."""
    import os
    import subprocess
    import sys

    code = ("import os; from dsom.perf import isolate_compile_cache as f; r = f(); "
            "print(r, os.environ['TORCHINDUCTOR_CACHE_DIR'], sep='|')")

    def run(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
        out = subprocess.run([sys.executable, "-c", code], env={**base, "TMPDIR": str(tmp_path), **env},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().split("|")

    returned, folder = run(ATEN_CPU_CAPABILITY="avx2")
    assert returned == folder and os.path.basename(folder) == "dsom-avx2"
    assert os.path.dirname(folder).startswith(str(tmp_path))  # under inductor's own default folder
    returned, folder = run()
    assert returned == folder and os.path.basename(folder).startswith("dsom-")
    native = os.path.basename(folder)
    # the user's folder is kept, each ISA in a folder of its own inside it; a dsom-<isa> folder is not nested again
    returned, folder = run(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"), ATEN_CPU_CAPABILITY="avx2")
    assert returned == folder == str(tmp_path / "mine" / "dsom-avx2")
    returned, folder = run(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"))
    assert returned == folder == str(tmp_path / "mine" / native)
    returned, folder = run(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine" / "dsom-avx2"), ATEN_CPU_CAPABILITY="avx2")
    assert returned == folder == str(tmp_path / "mine" / "dsom-avx2")
    returned, folder = run(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine" / "dsom-avx2"))
    assert returned == folder == str(tmp_path / "mine" / native)


def test_column_scores_equal_the_row_product_block_by_block(monkeypatch):
    """fp32 scores on a CPU are computed as ``T @ q^T`` one block of table rows at a time and copied transposed into
    the ``(B, N)`` result (or into a strided view of a caller's buffer): the same values as the float64 product, for
    a last block shorter than the others; the stacked teachers take the same path."""
    from dsom.models import products

    monkeypatch.setattr(products, "COLUMN_MIN_QUERIES", 1)
    monkeypatch.setattr(products, "COLUMN_BLOCK_BYTES", 1)
    monkeypatch.setattr(products, "COLUMN_MIN_ROWS", 16)
    g = torch.Generator().manual_seed(11)
    q, t = torch.randn(20, 12, generator=g), torch.randn(45, 12, generator=g)
    ref = (q.double() @ t.double().T).float()
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append((tuple(a[0].shape), tuple(a[1].shape)))
                        or mm(*a, **k))
    torch.testing.assert_close(products.column_scores(q, t), ref, rtol=1e-6, atol=1e-5)
    # three blocks of table rows, the last one short; the 20 queries padded with zeros to 24 (COLUMN_PAD = 8)
    assert calls == [((16, 12), (12, 24)), ((16, 12), (12, 24)), ((13, 12), (12, 24))]
    buf = torch.full((20, 3, 45), float("nan"))
    products.column_scores(q, t, buf[:, 1])
    torch.testing.assert_close(buf[:, 1], ref, rtol=1e-6, atol=1e-5)
    assert bool(buf[:, 0].isnan().all()) and bool(buf[:, 2].isnan().all())  # only its own slice written
    with torch.no_grad():
        qs, ts = torch.randn(3, 20, 12, generator=g), torch.randn(3, 45, 12, generator=g)
        torch.testing.assert_close(products.stacked_scores(qs, ts),
                                   torch.bmm(qs.double(), ts.double().transpose(1, 2)).float(), rtol=1e-6, atol=1e-5)


def test_student_scores_in_column_blocks_keep_values_and_gradients(monkeypatch):
    """Stage 2's student (``complex_scores``, fp32 on a CPU) scores in column blocks: loss and the gradients of the
    table and the relations equal the float64 autograd graph of gathered rows, complex product and ``q @ T^T``."""
    from dsom.models import products
    from dsom.models.fused import complex_scores
    from dsom.models.interaction import complex_query

    monkeypatch.setattr(products, "COLUMN_MIN_QUERIES", 1)
    monkeypatch.setattr(products, "COLUMN_BLOCK_BYTES", 1)
    monkeypatch.setattr(products, "COLUMN_MIN_ROWS", 16)
    g = torch.Generator().manual_seed(12)
    E, R2, D, P = 40, 6, 10, 25
    table = torch.randn(E, D, generator=g).requires_grad_()
    relations = torch.randn(R2, D, generator=g).requires_grad_()
    head, relation = torch.randint(0, E, (P,), generator=g), torch.randint(0, R2, (P,), generator=g)
    target = torch.randint(0, E, (P,), generator=g)
    w = torch.randn(P, E, generator=g)
    out = complex_scores(table, relations, head, relation, target, "fp32")
    got = (out.ce * w).sum()
    gt, gr = torch.autograd.grad(got, (table, relations))
    t64, r64 = table.detach().double().requires_grad_(), relations.detach().double().requires_grad_()
    ref = ((complex_query(t64[head], r64[relation]) @ t64.T) * w.double()).sum()
    rt, rr = torch.autograd.grad(ref, (t64, r64))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gr.double(), rr, rtol=1e-5, atol=1e-4)


def test_compiled_losses_do_not_recompile_when_a_first_batch_dim_equals_another_dim(monkeypatch):
    """MaybeCompiled traces without duck sizing: a first call whose batch dim equals the width (a pair batch of 1,000
    queries at rank 500) must not tie the two, or the next batch size compiles again. Counted with a backend that
    records each graph it is given; the process's duck-sizing setting is left as it was."""
    from torch.fx.experimental import _config as fx_config

    from dsom.perf import MaybeCompiled

    graphs = []
    real = torch.compile

    def counting(fn, **kw):
        return real(fn, backend=lambda gm, _: graphs.append(gm) or gm.forward, **kw)

    monkeypatch.setattr(torch, "compile", counting)
    torch._dynamo.reset()

    def tail(x, w):
        return torch.logsumexp(x @ w, 1).sum()

    f = MaybeCompiled(tail, enabled=True)
    before = fx_config.use_duck_shape
    for rows in (8, 9, 10, 3):  # the first call has rows == the width 8
        out = f(torch.ones(rows, 8), torch.ones(8, 8))
        assert torch.allclose(out, tail(torch.ones(rows, 8), torch.ones(8, 8)))
    assert len(graphs) == 1 and fx_config.use_duck_shape == before
    torch._dynamo.reset()
