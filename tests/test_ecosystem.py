"""razorpass where fine-tuners already are: Hugging Face Trainer, DDP and FSDP2 (gloo,
two CPU processes), and the warning when Dynamo runs a model without razorpass."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import razorpass
from razorpass import RazorConfig
from razorpass.backend import RazorBackend, RazorFallbackWarning

H, GLOBAL_B, WORLD = 32, 8, 2
# Each sample is one group (top-k: granularity="sample"; quantized: groups of H, one row
# of an (B, H) activation), so splitting the batch across processes keeps exactly the
# codes one process over the global batch keeps
CFG = RazorConfig(compiler="eager", granularity="sample", sparsity=0.5, quant_group_size=H)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(H, H)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(H, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_B, H, generator=g), torch.randint(0, 4, (GLOBAL_B,), generator=g)


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _plain(tensors) -> list:
    """Tensors as nested lists: a queue between processes cannot carry shared-memory
    tensors past the sender's exit. float32 -> Python float -> float32 is exact."""
    return [t.detach().tolist() for t in tensors]


def _spawn(worker) -> dict:
    """Run ``worker(rank, port, queue)`` in WORLD processes; {rank: what it put}. The
    queue is drained before joining (a full pipe would block a sender forever)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.spawn(worker, args=(_free_port(), queue), nprocs=WORLD, join=False)
    results = dict(queue.get() for _ in range(WORLD))
    while not procs.join():
        pass
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- Trainer
def test_trainer_route_trains_saves_and_reloads(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16, num_labels=2, problem_type="single_label_classification")
    model = BertForSequenceClassification(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": torch.randint(0, 100, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2), "unused_text": "dropped by Trainer"} for i in range(12)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0)
    # the documented route: two lines
    razorpass.compile(model, sparsity=0.5, compiler="eager", inplace=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with razorpass.record_compiles() as records, warnings.catch_warnings():
        warnings.simplefilter("error", RazorFallbackWarning)
        trainer.train()
    assert records and all(r.fallback is None for r in records)
    assert all(r.config.sparsity == 0.5 for r in records)  # the options reached the backend
    assert sum(len(r.compressed) for r in records) > 0
    trained = model.state_dict()
    assert not all(torch.equal(before[k], trained[k]) for k in before)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded, info = BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("_orig_mod" in k for k in reloaded.state_dict())
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)


def test_trainer_torch_compile_backend_name_is_refused_by_accelerate():
    # TrainingArguments(torch_compile_backend=...) goes through accelerate's fixed
    # DynamoBackend enum, which has no entry for third-party backends: documented as
    # unsupported (use the route above). This test notices if that ever changes.
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="RAZOR"):
        args = TrainingArguments(output_dir="unused", torch_compile=True, torch_compile_backend="razor", use_cpu=True,
                                 report_to=[])
        from accelerate.utils import TorchDynamoPlugin

        TorchDynamoPlugin(backend=args.torch_compile_backend)


# ------------------------------------------------------------------ fallback warning
def test_a_training_call_without_razor_warns_once():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, H)
    compiled = razorpass.compile(model, compiler="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x).sum().backward()
        compiled(x).sum().backward()
        assert not [w for w in caught if issubclass(w.category, RazorFallbackWarning)]
        with torch.compiler.set_stance("force_eager"):
            compiled(x).sum().backward()
            compiled(x).sum().backward()
        with torch.no_grad():  # inference is not a training step: no warning for it
            compiled(x)
    hits = [w for w in caught if issubclass(w.category, RazorFallbackWarning)]
    assert len(hits) == 1 and "MLP ran a training step without any razor graph" in str(hits[0].message)


def test_inplace_compiles_models_whose_forward_dynamo_skips():
    # nn.Module.compile() compiles nothing for nn.Sequential (its forward lives in
    # torch.nn, which Dynamo skips); razorpass.compile(inplace=True) compiles it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 4))
    keys = list(model.state_dict())
    with razorpass.record_compiles() as records:
        assert razorpass.compile(model, CFG, inplace=True) is model
        model(torch.randn(4, H)).sum().backward()
    assert len(records) == 1 and len(records[0].compressed) == 1
    assert list(model.state_dict()) == keys


def _sequential():
    return nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 4))


def test_torch_compile_of_a_sequential_compiles_and_compresses():
    torch.manual_seed(0)
    with razorpass.record_compiles() as records:
        torch.compile(_sequential(), backend="razor", options=CFG)(torch.randn(4, H)).sum().backward()
    assert [r.fallback for r in records] == [None] and len(records[0].compressed) == 2


# ---------------------------------------------------------------------------- DDP
def _join_group(rank, port):
    """Join the gloo group; this rank's share of the global batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x, y = _data()
    per = GLOBAL_B // WORLD
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _leave_group():
    """Wait for every rank before tearing the group down: a rank that closes its gloo
    connections while a peer still has a collective in flight makes the peer abort."""
    dist.barrier()
    dist.destroy_process_group()


def _assert_params_equal(params: list, model: nn.Module, msg: str) -> None:
    for p, q in zip(params, model.parameters()):
        torch.testing.assert_close(torch.tensor(p), q.detach(), rtol=1e-5, atol=1e-6, msg=msg)


def _ddp_worker(rank, port, queue):
    xs, ys = _join_group(rank, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    forms = {
        "torch.compile(DDP(model))": lambda m: torch.compile(DDP(m), backend=RazorBackend(CFG)),
        "DDP(razorpass.compile(model))": lambda m: DDP(razorpass.compile(m, CFG)),
        "razorpass.compile(DDP(model))": lambda m: razorpass.compile(DDP(m), CFG),
    }
    out = {}
    for name, wrap in forms.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP()
        with razorpass.record_compiles() as records:
            _sgd_step(wrap(model), xs, ys)
        out[name] = ([len(r.compressed) for r in records], [r.fallback for r in records],
                     _plain(model.parameters()))
    # Dynamo skips DDP's forward when it wraps a module whose forward lives in torch.nn:
    # nothing is compiled, in any backend (razorpass.compile(DDP(...)) compiles it)
    torch._dynamo.reset()
    with razorpass.record_compiles() as records:
        _sgd_step(torch.compile(DDP(_sequential()), backend="razor", options=CFG), xs, ys)
    queue.put((rank, (out, len(records))))
    _leave_group()


def test_ddp_compresses_and_matches_one_process_over_the_global_batch():
    results = _spawn(_ddp_worker)
    x, y = _data()
    torch._dynamo.reset()
    torch.manual_seed(0)
    single = MLP()
    with razorpass.record_compiles() as records:
        _sgd_step(razorpass.compile(single, CFG), x, y)
    assert [len(r.compressed) for r in records] == [2]  # fc2 and head inputs (fc1 reads the batch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = MLP()
    _sgd_step(dense, x, y)
    assert _max_diff(single, dense) > 1e-3  # the check below can tell razor from dense
    for rank, (out, sequential_graphs) in results.items():
        assert sequential_graphs == 0, rank
        for form, (compressed, fallbacks, params) in out.items():
            assert compressed == [2] and fallbacks == [None], (rank, form)
            _assert_params_equal(params, single, f"{form} rank {rank}")


# -------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank, port, queue):
    xs, ys = _join_group(rank, port)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    with razorpass.record_compiles() as records:
        for block in model.blocks:  # compile each block in place, then shard it
            razorpass.compile(block, CFG, inplace=True)
            fully_shard(block)
        fully_shard(model)
        _sgd_step(model, xs, ys)
    full = _plain(p.full_tensor() for p in model.parameters())
    queue.put((rank, ([len(r.compressed) for r in records], full)))
    _leave_group()


def test_fsdp2_with_blocks_compiled_in_place_matches_one_process():
    results = _spawn(_fsdp_worker)
    x, y = _data()
    torch._dynamo.reset()
    torch.manual_seed(0)
    single = Net()
    for block in single.blocks:
        razorpass.compile(block, CFG, inplace=True)
    _sgd_step(single, x, y)
    for rank, (compressed, params) in results.items():
        # block 1 compresses its input; block 0 reads the batch (held by the caller) and
        # the head lies outside the compiled blocks, so both stay dense
        assert compressed == [0, 1], rank
        _assert_params_equal(params, single, f"rank {rank}")
