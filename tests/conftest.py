import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The "triton" backend runs its kernels through Triton's interpreter on CPU tensors. The variable must be set
# before the kernels are defined (dropreg imports them lazily, on first use).
os.environ.setdefault("TRITON_INTERPRET", "1")

import dropreg  # noqa: E402
import dropreg.streamed  # noqa: E402

# Every backend runs the whole oracle suite. "torch-small-tiles" is the streamed backend with 3-row
# blocks and 5-entry vocabulary chunks, so row and vocabulary tails and the online merge are exercised.
# "cpu" is the C++ backend (its multi-tile paths are covered by tests/test_cpu_backend.py). "triton" is the
# GPU kernels' source under the interpreter, with 16x32 tiles, 16-wide K chunks and 2 vocabulary splits
# (dropreg/triton/utils.py), so tails, several tiles and the exact split merge are exercised.
BACKENDS = ["reference", "torch", "torch-small-tiles", "cpu", "triton"]
STREAMED_BACKENDS = ["torch", "torch-small-tiles"]


def use_backend(name: str, monkeypatch) -> str:
    if name == "torch-small-tiles":
        monkeypatch.setattr(dropreg.streamed, "default_blocks", lambda n_rows, vocab: (3, 5))
        monkeypatch.setattr(dropreg.streamed, "ce_only_blocks", lambda n_rows, vocab, dtype, device: (3, 5))
        return "torch"
    return name


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return use_backend(request.param, monkeypatch)


@pytest.fixture(params=STREAMED_BACKENDS)
def streamed_backend(request, monkeypatch):
    return use_backend(request.param, monkeypatch)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs each run; the seed is printed on failure so a case can be replayed.
    seed = int.from_bytes(os.urandom(4), "little") if "DROPREG_TEST_SEED" not in os.environ \
        else int(os.environ["DROPREG_TEST_SEED"])
    torch.manual_seed(seed)
    yield seed
