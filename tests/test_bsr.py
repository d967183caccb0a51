"""BSR: trainable blocks (freeze-blocks pass) and token selection (razorpass.bsr).

The compiled model is checked against an eager EViT-style reference written out for
the two test models (HF ViT and BERT, explicit attention probabilities, explicit
selection), independent of the hooks / TorchFunctionMode machinery it tests.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import razorpass
from razorpass import RazorConfig
from razorpass.passes.blocks import BlockError
from razorpass.bsr import TokenSelectionError

from .models import Block, NanoGPT

N_BLOCKS = 3


def tiny_vit(attn="sdpa"):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=N_BLOCKS, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    attn_implementation=attn)
    return ViTModel(cfg)


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=N_BLOCKS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg)


def vit_inputs():
    return (torch.randn(2, 3, 32, 32),)


def bert_inputs():
    # sample 0: no padding; 1: fewer real tokens than are kept (padding fills kept slots,
    # the fused token fuses only padding); 2: padding and real tokens both dropped.
    ids = torch.randint(1, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 9:] = 0
    return ids, mask


# ----------------------------------------------------------------------------- reference
def evit_select(x, cls_attn, keep_rate, fuse_token):
    """EViT's selection: top tokens by CLS attention (sorted), the rest fused."""
    B, N, C = x.shape
    left = math.ceil(keep_rate * (N - 1))
    if left >= N - 1:
        return x, None, None
    order = torch.sort(cls_attn.detach(), dim=1, descending=True, stable=True).indices
    idx = order[:, :left]
    compl = order[:, left:].sort(dim=1).values  # dropped positions, ascending (EViT's complement_idx)
    non_cls = x[:, 1:]
    parts = [x[:, :1], torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(-1, -1, C))]
    if fuse_token:
        non_topk = torch.gather(non_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
        weights = torch.gather(cls_attn, 1, compl).unsqueeze(-1)
        parts.append(torch.sum(non_topk * weights, dim=1, keepdim=True))
    return torch.cat(parts, dim=1), idx, compl


def _freezer(trainable, n_blocks):
    train = set(range(n_blocks)) if trainable is None else {i % n_blocks for i in trainable}
    return lambda i: (lambda p: p) if i in train else (lambda p: p.detach())


def _heads(t, B, N, H):
    return t.view(B, N, H, -1).transpose(1, 2)


def reference_vit(model, pixel_values, drop=(), keep_rate=0.5, fuse_token=True, trainable=None):
    """HF ViTModel forward, EViT-style, with BSR's freezing (before/between blocks: detached)."""
    x = model.embeddings(pixel_values)
    if trainable is not None:
        x = x.detach()
    n_blocks = len(model.layers)
    drop = {i % n_blocks for i in drop}
    weights_of = _freezer(trainable, n_blocks)
    for i, layer in enumerate(model.layers):
        w, att = weights_of(i), layer.attention
        B, N, C = x.shape
        H = att.num_attention_heads
        ln1, ln2 = layer.layernorm_before, layer.layernorm_after
        h = F.layer_norm(x, (C,), w(ln1.weight), w(ln1.bias), ln1.eps)
        q, k, v = (_heads(F.linear(h, w(m.weight), w(m.bias)), B, N, H) for m in (att.q_proj, att.k_proj, att.v_proj))
        attn = ((q @ k.transpose(-2, -1)) * att.scaling).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(a, w(att.o_proj.weight), w(att.o_proj.bias))
        if i in drop:
            x, _, _ = evit_select(x, attn[:, :, 0, 1:].mean(dim=1), keep_rate, fuse_token)
        h = F.layer_norm(x, (C,), w(ln2.weight), w(ln2.bias), ln2.eps)
        mlp = layer.mlp
        x = x + F.linear(F.gelu(F.linear(h, w(mlp.fc1.weight), w(mlp.fc1.bias))), w(mlp.fc2.weight), w(mlp.fc2.bias))
    x = model.layernorm(x)
    return x, model.pooler(x)


def reference_bert(model, input_ids, attention_mask, drop=(), keep_rate=0.5, fuse_token=True, trainable=None):
    """HF BertModel forward, EViT-style; selection on the attention residual sum (before
    the attention LayerNorm); the padding mask follows the tokens, the fused token is real
    iff it fused a real token."""
    x = model.embeddings(input_ids=input_ids)
    if trainable is not None:
        x = x.detach()
    valid = attention_mask.bool()
    layers = model.encoder.layer
    drop = {i % len(layers) for i in drop}
    weights_of = _freezer(trainable, len(layers))
    for i, layer in enumerate(layers):
        w, sa, so = weights_of(i), layer.attention.self, layer.attention.output
        B, N, C = x.shape
        H = sa.num_attention_heads
        q, k, v = (_heads(F.linear(x, w(m.weight), w(m.bias)), B, N, H) for m in (sa.query, sa.key, sa.value))
        bias = torch.zeros(B, 1, 1, N).masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = ((q @ k.transpose(-2, -1)) * sa.scaling + bias).softmax(dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(B, N, C)
        r = F.linear(ctx, w(so.dense.weight), w(so.dense.bias)) + x
        if i in drop:
            r, idx, compl = evit_select(r, attn[:, :, 0, 1:].mean(dim=1), keep_rate, fuse_token)
            if idx is not None:
                rest = valid[:, 1:]
                parts = [valid[:, :1], rest.gather(1, idx)]
                if fuse_token:
                    parts.append(rest.gather(1, compl).any(dim=1, keepdim=True))
                valid = torch.cat(parts, dim=1)
        h = F.layer_norm(r, (C,), w(so.LayerNorm.weight), w(so.LayerNorm.bias), so.LayerNorm.eps)
        inter, out = layer.intermediate, layer.output
        m = F.linear(F.gelu(F.linear(h, w(inter.dense.weight), w(inter.dense.bias))), w(out.dense.weight),
                     w(out.dense.bias))
        x = F.layer_norm(m + h, (C,), w(out.LayerNorm.weight), w(out.LayerNorm.bias), out.LayerNorm.eps)
    return x, model.pooler(x)


MODELS = {
    "vit": (tiny_vit, vit_inputs, reference_vit),
    "vit_softmax": (lambda: tiny_vit("eager"), vit_inputs, reference_vit),
    "bert": (tiny_bert, bert_inputs, reference_bert),
}


def _loss(last_hidden, pooled):
    return (last_hidden * torch.linspace(-1, 1, last_hidden.shape[-1])).pow(2).sum() + pooled.sum()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    last, pooled = fn(*inputs)
    _loss(last, pooled).backward()
    return last.detach(), _grads(model)


# ----------------------------------------------------------------------------- tests
def expected_counts(n, n_blocks, drop, keep_rate, fuse_token=True):
    """Tokens entering each block: N -> 1 + ceil(keep_rate * (N - 1)) [+ 1 fused] after a drop block."""
    counts = [n]
    for i in range(n_blocks):
        kept = math.ceil(keep_rate * (counts[-1] - 1))
        counts.append(1 + kept + fuse_token if i in drop else counts[-1])
    return counts


@pytest.mark.parametrize("fuse_token", [True, False])
def test_token_counts_per_block(fuse_token):
    torch.manual_seed(0)
    model = tiny_vit()
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    razorpass.bsr.apply_token_selection(model, RazorConfig(drop_layers=(1, 2), keep_rate=0.5, fuse_token=fuse_token))
    out = model(*vit_inputs()).last_hidden_state
    n = (32 // 8) ** 2 + 1
    want = expected_counts(n, N_BLOCKS, {1, 2}, 0.5, fuse_token)
    assert seen == want[:-1] and out.shape[1] == want[-1]
    assert want == razorpass.bsr.token_counts(n, N_BLOCKS, (1, 2), 0.5, fuse_token)
    # 16 patches + CLS; block 1 keeps CLS, ceil(0.5 * 16) = 8 tokens and the fused one
    assert want[:3] == [17, 17, 1 + 8 + fuse_token]


# Eager: a trainable selection block (0), a frozen selection block between trainable
# ones (1), two selections composed. Inductor (slow to compile on CPU, one model): a
# frozen selection block in the prefix, then trainable blocks.
CASES = [
    ("vit", "eager", (0, -1)),
    ("vit_softmax", "eager", (0, -1)),
    ("bert", "eager", (0, -1)),
    ("vit", "inductor", (1, -1)),
]


@pytest.mark.parametrize("name,compiler,trainable", CASES)
def test_matches_eager_reference(name, compiler, trainable):
    """Outputs and gradients of razorpass.compile(BSR) equal the EViT-style reference;
    only the trainable blocks and what follows the last block get gradients."""
    build, inputs_of, reference = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    inputs = inputs_of()
    ref_model = copy.deepcopy(model)
    bsr = dict(trainable_blocks=trainable, drop_layers=(0, 1), keep_rate=0.5)
    ref_out, ref_grads = _step(ref_model, lambda *a: reference(ref_model, *a, drop=bsr["drop_layers"],
                                                              trainable=bsr["trainable_blocks"]), inputs)
    compiled = razorpass.compile(model, compiler=compiler, targets=(), fullgraph=True, **bsr)
    with razorpass.record_compiles() as records:
        out, grads = _step(model, lambda *a: tuple(compiled(*a).values()), inputs)
    assert [r.fallback for r in records] == [None]
    tol = dict(rtol=1e-3, atol=1e-4)  # SDPA vs explicit softmax, decomposed vs fused layer norms
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    trained_blocks = {int(m.group(1)) for k in grads if (m := re.match(r"(?:encoder\.layer|layers)\.(\d+)\.", k))}
    assert trained_blocks == {i % N_BLOCKS for i in trainable}
    assert all(k.startswith(("layers.", "encoder.layer.", "layernorm.", "pooler.")) for k in grads), sorted(grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **tol, msg=lambda m: f"{name}/{k}: {m}")


def test_compiles_once_and_keeps_parameter_paths():
    """The hooks' shared state is written before it is read in every forward, so Dynamo
    guards nothing on it: later steps reuse the first graph. Module paths do not change."""
    torch.manual_seed(0)
    model = tiny_bert().train()
    names = [n for n, _ in model.named_parameters()]
    compiled = razorpass.compile(model, compiler="eager", drop_layers=(0, 1), trainable_blocks=(-1,), fullgraph=True)
    with razorpass.record_compiles() as records:
        for _ in range(3):
            _step(model, lambda *a: tuple(compiled(*a).values()), bert_inputs())
    assert len(records) == 1
    assert [n for n, _ in model.named_parameters()] == names


def test_trainable_blocks_through_torch_compile_backend():
    """trainable_blocks needs no model transform: options of backend="razor" suffice, and
    the gradients equal eager autograd with the other parameters frozen."""
    torch.manual_seed(0)
    model = tiny_vit().train()
    (x,) = vit_inputs()
    frozen = copy.deepcopy(model)
    for name, p in frozen.named_parameters():
        p.requires_grad_(name.startswith(("layers.1.", "layers.2.", "layernorm.", "pooler.")))
    ref_out, ref_grads = _step(frozen, lambda a: tuple(frozen(a).values()), (x,))
    compiled = torch.compile(model, backend="razor", fullgraph=True,
                             options={"trainable_blocks": [-2, -1], "compiler": "eager", "targets": ()})
    out, grads = _step(model, lambda a: tuple(compiled(a).values()), (x,))
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-3, atol=1e-5)


def _capture_graphs(model, inputs, config):
    """(forward, backward) graphs AOTAutograd builds for ``model`` after the
    pre-autograd passes, the number of tensors the forward saves and of frozen parameters."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from razorpass.passes import freeze_blocks
    from razorpass.passes.pipeline import run_pre_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def partition(joint, joint_inputs, **kw):
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        out = next(iter(fw.graph.find_nodes(op="output")))
        graphs["saved"] = len(out.args[0]) - kw["num_fwd_outputs"]
        return fw, bw

    def backend(gm, example_inputs):
        if config.trainable_blocks is not None:
            graphs["frozen"] = len(freeze_blocks.plan(gm, example_inputs, config))
        gm = run_pre_autograd(gm, example_inputs, config)
        return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=partition)(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    out.last_hidden_state.sum().backward()
    return graphs


def _matmuls(gm):
    ops = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.convolution_backward.default}
    return sum(n.op == "call_function" and n.target in ops for n in gm.graph.nodes)


@pytest.mark.parametrize("trainable", [(2,), (0, 2)], ids=["prefix", "between"])
def test_freezing_prunes_what_requires_grad_false_prunes(trainable):
    """The pass detaches exactly the parameters of the non-trainable blocks and of the
    embeddings, and AOTAutograd then prunes the same backward matmuls and saves the same
    tensors as eager freezing (requires_grad_(False)) would: nothing below the first
    trainable block, only input-gradient work in a frozen block between trainable ones."""
    torch.manual_seed(0)
    model = tiny_vit().train()
    inputs = vit_inputs()
    trains = tuple(f"layers.{i}." for i in trainable) + ("layernorm.", "pooler.")
    bsr = _capture_graphs(model, inputs, RazorConfig(trainable_blocks=trainable, targets=()))
    assert bsr["frozen"] == sum(not n.startswith(trains) for n, _ in model.named_parameters())
    # the frozen parameters are frozen on the model too, so every later path agrees
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith(trains)]
    for p in model.parameters():
        p.requires_grad_(True)
    full = _capture_graphs(model, inputs, RazorConfig(targets=()))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trains))
    frozen = _capture_graphs(model, inputs, RazorConfig(targets=()))
    assert _matmuls(bsr["bw"]) == _matmuls(frozen["bw"]) < _matmuls(full["bw"])
    assert bsr["saved"] == frozen["saved"] < full["saved"]


def test_nothing_saved_below_the_first_trainable_block():
    torch.manual_seed(0)
    model = tiny_vit().train()
    inputs = vit_inputs()
    with razorpass.record_compiles() as records:
        compiled = razorpass.compile(model, compiler="eager", trainable_blocks=(2,))
        compiled(*inputs).last_hidden_state.sum().backward()
    saved = [e for e in records[0].saved if not e.input]
    assert saved and not [e for e in saved if e.layer.startswith(("embeddings", "layers.0"))]
    # of block 1 only its output, the input of trainable block 2, may be saved
    assert all(e.shape == (2, 17, 32) for e in saved if e.layer.startswith("layers.1"))


def test_config_blocks_glob_selects_the_same_blocks():
    torch.manual_seed(0)
    a, b = tiny_vit(), tiny_vit()
    b.load_state_dict(a.state_dict())
    inputs = vit_inputs()
    razorpass.bsr.apply_token_selection(a, RazorConfig(drop_layers=(1,), keep_rate=0.3))
    razorpass.bsr.apply_token_selection(b, RazorConfig(drop_layers=(1,), keep_rate=0.3, blocks="layers.*"))
    assert torch.equal(a(*inputs).last_hidden_state, b(*inputs).last_hidden_state)


def test_reapplying_replaces_and_removing_restores():
    torch.manual_seed(0)
    model = tiny_vit()
    inputs = vit_inputs()
    dense = model(*inputs).last_hidden_state
    for keep in (0.5, 0.25):
        razorpass.bsr.apply_token_selection(model, RazorConfig(drop_layers=(0,), keep_rate=keep))
    assert model(*inputs).last_hidden_state.shape[1] == 1 + math.ceil(0.25 * 16) + 1
    razorpass.bsr.remove_token_selection(model)
    assert torch.equal(model(*inputs).last_hidden_state, dense)


# ----------------------------------------------------------------------------- errors
class _MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class _NoResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.fc = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = (t.view(*x.shape[:2], 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.fc(a)


class _Stack(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_index_the_model_does_not_have_lists_its_blocks():
    with pytest.raises(BlockError, match=r"drop_layers: block index 3 .*3 blocks \(ViTLayer\) at layers\.0\.\.2"):
        razorpass.compile(tiny_vit(), drop_layers=[3])
    with pytest.raises(BlockError, match=r"trainable_blocks: block index -4 .*layers\.0\.\.2"):
        razorpass.compile(tiny_vit(), drop_layers=[1], trainable_blocks=[-4])
    compiled = torch.compile(tiny_vit(), backend="razor", options={"trainable_blocks": [7], "compiler": "eager"})
    with pytest.raises(Exception, match=r"trainable_blocks: block index 7 .*layers\.0\.\.2"):
        compiled(*vit_inputs())


@pytest.mark.parametrize("keep_rate", [0.0, 1.5, -0.1])
def test_keep_rate_out_of_range(keep_rate):
    with pytest.raises(ValueError, match="keep_rate"):
        razorpass.compile(tiny_vit(), drop_layers=[1], keep_rate=keep_rate)


@pytest.mark.parametrize(
    "model,error,match",
    [
        (_Stack(_MLPBlock), BlockError, r"no list of attention blocks.*blocks: 3 x _MLPBlock"),
        (nn.Linear(8, 8), BlockError, "no nn.ModuleList / nn.Sequential"),
        (_Stack(_NoResidualBlock), TokenSelectionError, "no residual add"),
        (NanoGPT(), TokenSelectionError, "causal"),
    ],
    ids=["no-attention", "no-block-list", "no-residual", "causal-no-cls"],
)
def test_models_token_selection_cannot_apply_to(model, error, match):
    with pytest.raises(error, match=match):
        razorpass.compile(model, drop_layers=[1])


def test_drop_layers_through_backend_name_points_to_razorpass_compile():
    compiled = torch.compile(tiny_vit(), backend="razor", options={"drop_layers": [1], "compiler": "eager"})
    with pytest.raises(Exception, match=r"razorpass\.compile\(model, drop_layers="):
        compiled(*vit_inputs())


def test_memory_report_applies_token_dropping():
    """memory_report with drop_layers measures what razorpass.compile's model saves
    (fewer tokens after the selection block), dense and compressed, and leaves the
    caller's model without token selection."""
    from razorpass.report import measure_saved

    torch.manual_seed(0)
    model = tiny_vit().train()
    (x,) = vit_inputs()
    bsr = dict(drop_layers=(0,), keep_rate=0.5, compiler="eager")
    report = razorpass.memory_report(model, x, sparsity=0.9, targets=("linear",), block_size=64, **bsr)
    assert model(x).last_hidden_state.shape[1] == 17  # the caller's model keeps every token

    def saved_by_compile(**options):
        m = copy.deepcopy(model)
        compiled = razorpass.compile(m, **bsr, **options)
        compiled(x)  # compile outside the measurement
        return sum(b for _, b in measure_saved(lambda: compiled(x), [*m.parameters(), *m.buffers(), x]))

    torch._dynamo.reset()
    assert report.baseline_bytes == saved_by_compile(targets=())
    torch._dynamo.reset()
    assert report.saved_bytes == saved_by_compile(sparsity=0.9, targets=("linear",), block_size=64)
    torch._dynamo.reset()
    no_drop = razorpass.memory_report(model, x, targets=(), compiler="eager")
    assert report.baseline_bytes < no_drop.baseline_bytes
    assert sum(r.saved_bytes for r in report.rows) == report.saved_bytes
    assert report.by_op_class()["linear"][1] < report.by_op_class()["linear"][0]


@pytest.mark.parametrize("path", ["flop_counter_first", "flop_counter_later", "recompile_limit"])
def test_what_trains_does_not_depend_on_which_path_ran(path):
    """trainable_blocks freezes parameters on the model itself (requires_grad=False), so a
    forward Dynamo runs eagerly (a dispatch mode forces it; the recompile limit is hit)
    trains the same parameters as the razor graph: the last block, the final norm and
    the pooler."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = tiny_vit().train()
    trains = (f"layers.{N_BLOCKS - 1}.", "layernorm.", "pooler.")
    expected = sorted(n for n, _ in model.named_parameters() if n.startswith(trains))
    compiled = razorpass.compile(model, trainable_blocks=(-1,), targets=(), compiler="eager")

    def step(x):
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
        return sorted(n for n, p in model.named_parameters() if p.grad is not None)

    if path == "flop_counter_first":
        with FlopCounterMode(display=False):
            assert step(vit_inputs()[0]) == expected
        assert step(vit_inputs()[0]) == expected
    elif path == "flop_counter_later":
        assert step(vit_inputs()[0]) == expected
        with FlopCounterMode(display=False):
            assert step(vit_inputs()[0]) == expected
        assert step(vit_inputs()[0]) == expected
    else:
        with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
            for batch in (2, 3, 4):
                assert step(torch.randn(batch, 3, 32, 32)) == expected


def test_a_parameter_registered_before_the_blocks_but_used_after_them_is_refused():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 4)  # registered before the blocks, runs after them
            self.blocks = nn.ModuleList([Block(16, 2) for _ in range(3)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    model = HeadFirst()
    compiled = razorpass.compile(model, trainable_blocks=(-1,), targets=(), compiler="eager")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="BlockError: trainable_blocks: parameter 'head.weight' is registered before the block list"):
        compiled(torch.randn(2, 5, 16)).sum().backward()
