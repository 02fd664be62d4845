"""dsom.train.optim.ShadowAdagrad: torch's Adagrad step (to float rounding), plus a bfloat16 copy of each large
table written by the update and handed to the next bf16 product only while the table is unchanged since."""

from __future__ import annotations

import pytest
import torch

from dsom.config import Config, set_value
from dsom.models import fused
from dsom.models.products import bf16_shadow
from dsom.train import optim
from dsom.train.loop import make_optimizer
from dsom.train.optim import ShadowAdagrad


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(optim, "SHADOW_MIN_NUMEL", 100)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("lr_decay", [0.0, 0.05])
def test_shadow_adagrad_is_torchs_adagrad_and_its_shadow_is_the_tables_bf16_cast(small_threshold, compiled, lr_decay):
    g = torch.Generator().manual_seed(3)
    big, small = torch.randn(40, 8, generator=g), torch.randn(5, 4, generator=g)  # 320 >= 100 elements; 20 < 100
    ours = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    ref = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    opt = ShadowAdagrad(ours, lr=0.1, fused=True, compile=compiled)
    opt.param_groups[0]["lr_decay"] = lr_decay
    ref_opt = torch.optim.Adagrad(ref, lr=0.1, lr_decay=lr_decay, fused=True)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        kept = [p.grad for p in ours]
        opt.step()
        ref_opt.step()
        assert all(p.grad is k for p, k in zip(ours, kept))  # gradients left in place
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["sum"], ref_opt.state[q]["sum"], rtol=1e-6, atol=1e-7)
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])
        shadow = bf16_shadow(ours[0])
        assert shadow is not None and shadow.dtype == torch.bfloat16
        assert torch.equal(shadow, ours[0].detach().to(torch.bfloat16))
        assert fused._cast(ours[0], "bf16") is shadow  # the next product reads it instead of casting
        assert bf16_shadow(ours[1]) is None  # below SHADOW_MIN_NUMEL: torch's own step, no copy kept


def test_a_table_written_after_the_update_is_cast_again(small_threshold):
    p = torch.nn.Parameter(torch.randn(30, 10))
    opt = ShadowAdagrad([p], lr=0.1, compile=False)
    p.grad = torch.randn(30, 10)
    opt.step()
    assert bf16_shadow(p) is not None
    with torch.no_grad():
        p.mul_(2.0)  # any in-place write (load_state_dict, copy_) makes the copy stale
    assert bf16_shadow(p) is None
    cast = fused._cast(p, "bf16")
    assert torch.equal(cast, p.detach().to(torch.bfloat16))
    with torch.no_grad():
        p.copy_(torch.randn(30, 10))
    assert not torch.equal(fused._cast(p, "bf16"), cast)


def test_shadow_adagrad_state_loads_into_torch_adagrad_and_back(small_threshold):
    p = torch.nn.Parameter(torch.randn(30, 10))
    opt = ShadowAdagrad([p], lr=0.1, compile=False)
    for _ in range(3):
        p.grad = torch.randn(30, 10)
        opt.step()
    plain = torch.optim.Adagrad([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    plain.load_state_dict(opt.state_dict())
    again = ShadowAdagrad([torch.nn.Parameter(p.detach().clone())], lr=0.1, compile=False)
    again.load_state_dict(plain.state_dict())
    (q,) = again.param_groups[0]["params"]
    torch.testing.assert_close(again.state[q]["sum"], opt.state[p]["sum"])
    assert float(again.state[q]["step"]) == 3.0


def test_only_bf16_products_get_the_shadowing_adagrad():
    cfg = Config()
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    assert isinstance(make_optimizer(p, cfg, "bf16"), ShadowAdagrad)
    assert type(make_optimizer(p, cfg, "fp32")) is torch.optim.Adagrad
    assert type(make_optimizer(p, cfg, "bf16sim")) is torch.optim.Adagrad
    set_value(cfg, "train.optimizer", "adam")
    assert type(make_optimizer(p, cfg, "bf16")) is torch.optim.Adam
