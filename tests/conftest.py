import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# DROPREG_TEST_DEVICE picks where the suite's tensors live:
# * "cpu" (default, CI): the "triton" backend runs its kernels through Triton's interpreter on CPU tensors. The
#   variable must be set before the kernels are defined (dropreg imports them lazily, on first use).
# * "cuda" (a GPU machine): every tensor a test makes without a device goes to the GPU
#   (torch.set_default_device), the Triton kernels are compiled, tests/test_triton_gpu.py runs, and the tests
#   marked cpu_only (the C++ backend, CPU memory caps, gloo, CPU benchmarks) are skipped.
TEST_DEVICE = os.environ.get("DROPREG_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"DROPREG_TEST_DEVICE: expected 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif not torch.cuda.is_available():
    raise pytest.UsageError("DROPREG_TEST_DEVICE=cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
elif os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("DROPREG_TEST_DEVICE=cuda runs the compiled Triton kernels: unset TRITON_INTERPRET")
else:
    torch.set_default_device("cuda")

import dropreg  # noqa: E402
from dropreg import BlockPlan, get_backend  # noqa: E402

# Every backend runs the whole oracle suite. "torch-small-tiles" is the streamed backend with 3-row
# blocks and 5-entry vocabulary chunks, so row and vocabulary tails and the online merge are exercised.
# "cpu" is the C++ backend (its multi-tile paths are covered by tests/test_cpu_backend.py). "triton" is the
# GPU kernels' source under the interpreter, with 16x32 tiles, 16-wide K chunks and 2 vocabulary splits
# (dropreg/triton/utils.py), so tails, several tiles and the exact split merge are exercised.
# "chunked" is the GPU path's driver (dropreg/chunked.py) with 3-row blocks and 5-entry chunks and its PyTorch
# epilogues; "chunked-triton" the same with 4-row blocks, 7-entry chunks and the Triton epilogues (under the
# interpreter on CPU, compiled with DROPREG_TEST_DEVICE=cuda).
BACKENDS = ["reference", "torch", "torch-small-tiles", "cpu", "triton", "chunked", "chunked-triton"]
if TEST_DEVICE == "cuda":
    BACKENDS.remove("cpu")  # the C++ kernels take CPU tensors only
STREAMED_BACKENDS = ["torch", "torch-small-tiles"]


def small_blocks(rows: int, chunk: int, **plan) -> BlockPlan:
    """A plan whose every driver (terms, CE only) runs ``rows``-row blocks and ``chunk``-entry vocabulary chunks."""
    return BlockPlan(row_block=rows, vocab_chunk=chunk, ce_row_block=rows, ce_vocab_chunk=chunk, **plan)


# The suite's backend variants: a registered backend with a block plan, passed as backend=.
VARIANTS = {
    "torch-small-tiles": lambda: get_backend("torch").with_plan(small_blocks(3, 5)),
    "chunked": lambda: get_backend("chunked").with_plan(small_blocks(3, 5, epilogues="torch")),
    "chunked-triton": lambda: get_backend("chunked").with_plan(small_blocks(4, 7, epilogues="triton")),
}


def load_tool(name: str):
    """The script tools/<name>.py as a module (tools are not part of the package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def use_backend(name: str):
    """``backend=`` for the suite's backend ``name``: a registered name, or one of :data:`VARIANTS`."""
    return VARIANTS[name]() if name in VARIANTS else name


def backend_name(backend) -> str:
    """The registered name behind a ``backend=`` value."""
    return backend if isinstance(backend, str) else backend.name


def as_backend(backend):
    """The :class:`dropreg._dispatch.Backend` behind a ``backend=`` value."""
    return get_backend(backend) if isinstance(backend, str) else backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    return use_backend(request.param)


@pytest.fixture(params=STREAMED_BACKENDS)
def streamed_backend(request):
    return use_backend(request.param)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs each run; a failure's report names the seed (pytest_runtest_makereport) to replay it.
    seed = int.from_bytes(os.urandom(4), "little") if "DROPREG_TEST_SEED" not in os.environ \
        else int(os.environ["DROPREG_TEST_SEED"])
    request.node.dropreg_seed = seed
    torch.manual_seed(seed)
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "dropreg_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("replay", f"DROPREG_TEST_SEED={seed} python -m pytest '{item.nodeid}'"))


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="cpu_only: runs with DROPREG_TEST_DEVICE=cpu (the default)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        cpp_backend = any("backend" in key and value == "cpu" for key, value in params.items())
        if "cpu_only" in item.keywords or cpp_backend:
            item.add_marker(skip)
