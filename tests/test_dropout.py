"""model/dropout.py: F.dropout's masks, draw for draw, on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.dropout as dropout_module
from model.dropout import apply_dropout, dropout_mask


LAYOUTS = {"contiguous": lambda x: x, "transposed": lambda x: x.t(), "strided": lambda x: x[:, ::3]}


@pytest.mark.parametrize("p", [0.1, 0.4, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fast_path", [True, False])
def test_the_same_output_and_generator_state_as_f_dropout(p, dtype, layout, fast_path, monkeypatch):
    if not fast_path:                                        # as on a torch whose bernoulli_ draws otherwise
        monkeypatch.setattr(dropout_module, "_uniform_is_bernoulli", lambda: False)
    x = LAYOUTS[layout](torch.randn(37, 300, dtype=dtype, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(5)
    want = F.dropout(x, p, True)
    after_want = torch.rand(3)
    torch.manual_seed(5)
    got = apply_dropout(x, p, True)
    after_got = torch.rand(3)
    assert torch.equal(got, want)
    assert torch.equal(after_got, after_want)                # the generator moved on by as much
    assert got.stride() == want.stride()


def test_the_mask_is_zero_or_the_scale_in_the_right_proportion():
    torch.manual_seed(0)
    mask = dropout_mask(torch.empty(200_000), 0.4)
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / 0.6).item()}
    assert (mask > 0).float().mean().item() == pytest.approx(0.6, abs=0.005)   # > 4 standard errors
    assert torch.equal(dropout_mask(torch.ones(5), 1.0), torch.zeros(5))


def test_gradient_is_the_mask():
    x = torch.randn(50, 20, requires_grad=True)
    torch.manual_seed(2)
    apply_dropout(x, 0.3, True).sum().backward()
    torch.manual_seed(2)
    assert torch.equal(x.grad, dropout_mask(x, 0.3))


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(4, 6)
    state = torch.get_rng_state()
    assert apply_dropout(x, 0.5, False) is x
    assert apply_dropout(x, 0.0, True) is x
    assert torch.equal(torch.get_rng_state(), state)        # nothing drawn


def test_this_torch_takes_the_fast_path_and_bad_probabilities_are_refused():
    # torch 2.13 (CI's) draws CPU masks as _uniform_mask does; the check leaves the generator alone
    state = torch.get_rng_state()
    dropout_module._uniform_is_bernoulli.cache_clear()
    assert dropout_module._uniform_is_bernoulli()
    assert torch.equal(torch.get_rng_state(), state)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            apply_dropout(torch.ones(3), p, True)
