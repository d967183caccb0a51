"""razorpass.gradient_fidelity: gradient cosines against the exact gradient, checked
against gradients written out by hand."""

import pytest
import torch
import torch.nn as nn

import razorpass
from razorpass.reference import sparsify

from .models import tiny_vit


def test_linear_row_equals_the_hand_written_weight_gradient():
    # y = x Wᵀ, loss = sum(y * c): dL/dW = cᵀ x, and the linear rule uses sparsify(x)
    torch.manual_seed(0)
    lin = nn.Linear(48, 6, bias=False)
    x = torch.randn(5, 48, requires_grad=True)  # needs a gradient: not an input held by the caller
    c = torch.randn(5, 6)
    cfg = razorpass.RazorConfig(policy="backrazor", sparsity=0.8, block_size=16, targets=("linear",))
    report = razorpass.gradient_fidelity(lin, (x,), lambda y: (y * c).sum(), cfg)
    dense = (c.T @ x.detach()).double().flatten()
    sparse = (c.T @ sparsify(x, cfg)).double().flatten()
    cos = float(dense @ sparse / (dense.norm() * sparse.norm()))
    (row,) = report.rows
    assert row.targets == ("linear",) and row.changed == 1 and row.worst_param == "weight"
    assert row.cosine == pytest.approx(cos, abs=1e-6) and row.worst_cosine == pytest.approx(cos, abs=1e-6)
    assert row.norm_ratio == pytest.approx(float(sparse.norm() / dense.norm()), rel=1e-6)
    assert 0.3 < row.cosine < 0.999  # the rule visibly changed the gradient


def test_nothing_dropped_means_exact_gradients():
    torch.manual_seed(0)
    model, x = tiny_vit().train(), torch.randn(2, 3, 32, 32)
    report = razorpass.gradient_fidelity(model, x, policy="backrazor", sparsity=0.0, value_dtype="float32", targets=("all",))
    assert len(report.rows) > 1
    for row in report.rows:
        assert row.cosine == pytest.approx(1.0, abs=1e-6) and row.norm_ratio == pytest.approx(1.0, abs=1e-5)


def test_rows_per_class_and_which_parameters_change():
    torch.manual_seed(0)
    model, x = tiny_vit().train(), torch.randn(2, 3, 32, 32)
    before = [p.grad for p in model.parameters()]
    report = razorpass.gradient_fidelity(model, x, policy="backrazor", sparsity=0.9, targets=("linear", "layernorm", "mask"))
    assert [r.targets for r in report.rows] == [("linear",), ("layernorm",), ("linear", "layernorm")]
    linear_weights = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    # the linear rule touches weight gradients only: biases and everything else stay exact
    assert report.rows[0].changed == linear_weights
    # the LayerNorm rule changes input gradients: every parameter below the last LayerNorm
    assert report.rows[1].changed > linear_weights
    assert all(0 < r.cosine < 1 for r in report.rows)
    assert [p.grad for p in model.parameters()] == before  # gradients left as they were
    assert "linear+layernorm" in report.table()


def test_loss_must_be_a_scalar():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="scalar"):
        razorpass.gradient_fidelity(lin, torch.randn(2, 4), lambda y: y, targets=("linear",))


def test_a_frozen_model_is_rejected():
    lin = nn.Linear(4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        razorpass.gradient_fidelity(lin, torch.randn(2, 4))


def test_stochastic_rows_average_their_draws_with_the_dense_dropout_masks():
    """A linear layer's weight gradient under stochastic rounding, written out by hand:
    ``cᵀ · decode(x)`` for each rounding seed 0 .. draws-1, averaged; the mean of
    more draws is closer to the dense gradient; rounding to nearest has one draw."""
    from razorpass.reference import quantize_group

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 6, bias=False)).train()
    x = torch.randn(8, 64, requires_grad=True)
    c = torch.randn(8, 6)
    opts = dict(targets=("linear",), quant_bits=2, quant_group_size=64, quant_rounding="stochastic")
    one, many = (razorpass.gradient_fidelity(lin, (x,), lambda y: (y * c).sum(), draws=d, seed=3, **opts)
                 for d in (1, 16))
    torch.manual_seed(3)
    h = lin[0](x.detach())  # the dense step's dropout mask (the rows draw the same one)
    dense = (c.T @ h).double().flatten()

    def cos(g):
        return float(dense @ g / (dense.norm() * g.norm()))

    by_hand = [(c.T @ quantize_group(h, 64, 2, seed=s)).double().flatten() for s in range(16)]
    assert one.rows[0].cosine == pytest.approx(cos(by_hand[0]), abs=1e-6)
    assert many.rows[0].cosine == pytest.approx(cos(sum(by_hand) / 16), abs=1e-6)
    assert many.draws == 16 and "mean of 16 draws" in many.table()
    assert 1 - many.rows[0].cosine < (1 - one.rows[0].cosine) / 4
    nearest = razorpass.gradient_fidelity(lin, (x,), lambda y: (y * c).sum(), draws=16, seed=3,
                                          **{**opts, "quant_rounding": "nearest"})
    assert nearest.draws == 1
    with pytest.raises(ValueError, match="draws must be a positive int"):
        razorpass.gradient_fidelity(lin, (x,), lambda y: (y * c).sum(), draws=0, **opts)
