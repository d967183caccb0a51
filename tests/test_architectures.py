"""The default policy on Hugging Face architectures that no other test builds: compiled
gradients (eager compiler, float64) against ``razorpass.reference``.

Each of these found a place where the compiled path and the reference stored different
things: a channels-last convolution input (ConvNeXt), an in-place residual after a
BatchNorm (ResNet), a reshape of the softmax output read by P·V and a parameter read
through an identity dropout (DeBERTa-v2), a LayerNorm over a transposed input (Swin,
Whisper). The others cover what those share: weight sharing across layers (ALBERT),
rotary embeddings and RMSNorm (Llama), T5's relative attention bias, BEiT's.

In float64 the two sides agree to rounding, except where the quantizer's float32 cast
rounds a value the two sides computed in a different order to a neighbouring float32
(rotary embeddings: ~1e-8); a code step would be ~1e-2. The reference itself must move
the gradient (``ref-vs-dense``), so the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch

import razorpass
from razorpass import RazorConfig, reference

T = pytest.importorskip("transformers")

B, S = 4, 16
H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _text(n_labels=3):
    return dict(input_ids=torch.randint(0, 64, (B, S)), labels=torch.arange(B) % n_labels)


def _image(n_labels=5):
    return dict(pixel_values=torch.randn(B, 3, 32, 32), labels=torch.arange(B) % n_labels)


MODELS = {
    "albert": lambda: (T.AlbertForSequenceClassification(T.AlbertConfig(
        vocab_size=64, embedding_size=16, max_position_embeddings=32, **H, **NO_DROP, classifier_dropout_prob=0.0,
        num_labels=3)), _text()),
    "deberta-v2": lambda: (T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
        vocab_size=64, max_position_embeddings=32, **H, **NO_DROP, pooler_dropout=0.0, num_labels=3,
        relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])), _text()),
    "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, max_position_embeddings=32, num_key_value_heads=2,
                                                        **H)),
                      dict(input_ids=torch.randint(0, 64, (B, S)), labels=torch.randint(0, 64, (B, S)))),
    "t5-encoder": lambda: (T.T5EncoderModel(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu")),
                           dict(input_ids=torch.randint(0, 64, (B, S)))),
    "beit": lambda: (T.BeitForImageClassification(T.BeitConfig(
        image_size=32, patch_size=8, **H, **NO_DROP, num_labels=5, use_relative_position_bias=True,
        drop_path_rate=0.0)), _image()),
    "swin": lambda: (T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, **NO_DROP,
        drop_path_rate=0.0, num_labels=5)), _image()),
    "convnext": lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], drop_path_rate=0.0, num_labels=5)),
        _image()),
    "resnet": lambda: (T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
        num_labels=5)), _image()),
    "whisper": lambda: (T.WhisperForAudioClassification(T.WhisperConfig(
        num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=16, dropout=0.0, num_labels=3)),
        dict(input_features=torch.randn(B, 8, 32), labels=torch.arange(B) % 3)),
}


def _loss(out):
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.last_hidden_state.square().mean()


def _grads(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    _loss(fn(**inputs)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_an_unseen_architecture_matches_the_reference(name):
    torch._dynamo.reset()  # one frame of transformers' serves every model: keep under the recompile limit
    torch.manual_seed(0)
    try:
        model, inputs = MODELS[name]()
    except (TypeError, ValueError) as e:  # a transformers release that names its options differently
        pytest.skip(f"cannot build {name} with this transformers: {e}")
    with torch.no_grad():  # norm weights away from 1, so that a wrong x̂ would show
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and "Norm" in type(m).__name__:
                w.uniform_(0.5, 1.5)
    model.train().double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    cfg = RazorConfig(compiler="eager")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _grads(model, model, inputs)
    model.load_state_dict(state)
    with reference.apply(model, cfg):
        ref = _grads(model, model, inputs)
    model.load_state_dict(state)
    with razorpass.record_compiles() as records:
        got = _grads(model, razorpass.compile(model, cfg), inputs)
    assert records and all(r.fallback is None and r.excluded_roots == [] for r in records)
    assert sum(len(r.compressed) for r in records) > 0
    assert _rel(ref, dense) > 1e-2  # the encodings move the gradient: the comparison can fail
    assert _rel(got, ref) < 1e-6, f"{name}: compiled gradient {_rel(got, ref):.1e} off the reference"
