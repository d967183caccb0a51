import os

# Tests that inspect partitions must see the partitioner run: no cache of compiled
# graphs (Inductor's FX graph cache, AOTAutograd's cache) and no dynamic-shape profile
# carried over from another run. Inductor's cache of compiled C++ kernels stays on: it
# only skips the C++ compiler for a kernel source it has built before, which the tiny
# models of the suite repeat many times.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
os.environ.setdefault("TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO", "0")
# Inductor compiles kernels in this process: the xdist workers already fill the cores,
# and a pool of compile workers per test worker only adds start-up and contention.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A pass failure raises instead of compiling without compression (tests of the
# fallback itself unset it), so a pass bug cannot pass as a silent fallback.
os.environ.setdefault("RAZORPASS_STRICT", "1")
# Triton kernels run under the interpreter on machines without a GPU. The flag must
# be in the environment before anything imports Triton (Inductor does, mid-session).
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core), one intra-op thread per
# worker: the workers already fill the cores, and more threads only oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# Inductor's C++ kernels are scalar in the suite: the passes and the graphs they leave
# are what the tests check, and scalar kernels build in a fraction of the time of
# vectorized ones (the suite's largest cost on 2 cores). Tests of float code that
# Inductor generates from razorpass's own forms, bit for bit, are marked ``vectorized``
# and compile as users' kernels do (the integer mask packing has no rounding to part).
SCALAR_INDUCTOR = {"cpp.simdlen": 1}


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    torch._dynamo.reset()
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config

    scalar = request.node.get_closest_marker("vectorized") is None
    with inductor_config.patch(SCALAR_INDUCTOR if scalar else {}):
        yield
    torch._dynamo.reset()
