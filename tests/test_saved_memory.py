"""What a razor-compiled step saves for backward, in exact bytes."""

import pytest
import torch
import torch.nn as nn

import razorpass
from razorpass import RazorConfig
from razorpass.format import compressed_nbytes
from razorpass.report import measure_saved


def _chain(frozen=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 8))
    for i in frozen:
        model[i].requires_grad_(False)
    return model


def _saved_bytes(model, x, cfg):
    compiled = razorpass.compile(model, cfg)
    compiled(x)  # compile outside the hooks
    saved = measure_saved(lambda: compiled(x), exclude=[*model.parameters(), x])
    return sum(b for _, b in saved), saved


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("granularity", ["block", "sample"])
def test_saved_bytes_equal_the_analytic_compressed_size(compiler, granularity):
    model, x = _chain(), torch.randn(6, 5, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.9, granularity=granularity, block_size=64, compiler=compiler)
    dense, _ = _saved_bytes(model, x, RazorConfig(policy="backrazor", targets=(), compiler=compiler))
    got, _ = _saved_bytes(model, x, cfg)
    # Linear chain: the inputs of the three layers are all that is saved (weights are
    # parameters, excluded). Dense: h0 and h1 (x is the caller's input, saved as is and
    # not counted). Razor: compressed h0 and h1.
    h = (6, 5, 40)
    assert dense == 2 * 6 * 5 * 40 * 4
    assert got == 2 * compressed_nbytes(h, cfg, torch.float32)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_frozen_layer_input_is_never_stored(compiler):
    model, x = _chain(frozen=(1,)), torch.randn(6, 5, 24)
    cfg = RazorConfig(policy="backrazor", sparsity=0.9, block_size=64, compiler=compiler)
    with razorpass.record_compiles() as records:
        got, saved = _saved_bytes(model, x, cfg)
    # layer 1 is frozen: its input (h0) is needed by no gradient and not saved at all;
    # x (layer 0's input) is the caller's; h1 (layer 2's input) is saved compressed.
    assert [c.layer for c in records[0].compressed] == ["2"]
    assert len(saved) == 2
    assert got == compressed_nbytes((6, 5, 40), cfg, torch.float32)


def test_memory_report_rows_add_up_and_match_measurement():
    model, x = _chain(), torch.randn(6, 5, 24)
    rep = razorpass.memory_report(model, x, policy="backrazor", sparsity=0.9, block_size=64, compiler="eager")
    assert rep.batch_size == 6 and rep.fallbacks == []
    assert rep.baseline_bytes == 2 * 6 * 5 * 40 * 4
    assert sum(r.saved_bytes for r in rep.rows) == rep.saved_bytes
    cfg = rep.config
    assert rep.by_op_class()["linear"] == (2 * 6 * 5 * 40 * 4, 2 * compressed_nbytes((6, 5, 40), cfg, torch.float32))
    assert "total (measured)" in rep.table()


def test_backrazor_analytic_accounting_matches_the_architecture():
    """Back Razor's formula, applied to a tiny HF ViT, against the count of tensors its
    recipe stores, derived from the architecture alone: per layer the q, k, v, output,
    fc1 and fc2 Linear inputs (q/k/v: three copies of T x H), the GELU input dense fp16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    model = transformers.ViTModel(cfg, add_pooling_layer=False)
    batch, sparsity = 2, 0.9
    report = razorpass.memory_report(model, torch.randn(batch, 3, 32, 32), policy="backrazor", sparsity=sparsity,
                                     targets=("all",), compiler="eager")
    got = report.backrazor_analytic()

    tokens = (32 // 8) ** 2 + 1
    hidden, inter, layers, density = 64, 128, 2, 1 - sparsity

    def sparse(n):  # n fp32 elements, fp16 values + 1-bit mask
        return n * 4 * density * 0.5 + n / 8

    linear = layers * batch * (3 * sparse(tokens * hidden) + 2 * sparse(tokens * hidden) + sparse(tokens * inter))
    assert got["linear"] == pytest.approx(linear)
    assert got["gelu"] == pytest.approx(layers * batch * tokens * inter * 2)
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))
    with pytest.raises(ValueError, match="targets=\\('all',\\)"):
        razorpass.memory_report(model, torch.randn(batch, 3, 32, 32), policy="backrazor", sparsity=sparsity,
                                compiler="eager").backrazor_analytic()
