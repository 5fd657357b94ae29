"""Helpers shared by every Triton kernel of dropreg (device side) and their launchers (host side).

Device side: the logit tile ``z = h W^T + b`` over a K loop (and its K step and epilogue, for kernels that
fuse more products into that loop), the row probabilities, the grouped tile order, the operand cast
for ``tl.dot``, the target-logit pick and the Philox sign block. Host side: interpreter detection, the
tile configurations and the ``LaunchPlan`` made from them (the only place block sizes, warps, stages and
vocabulary splits are chosen; the launchers take a plan, so tools pass one instead of patching tables),
descriptor-ready operands and the exact merge of per-vocabulary-split partials.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .._policy import accumulation_dtype

import triton
import triton.language as tl

# Fused multiply-add allowed, passed at launch (Triton 3.9 warns that its default changes in 3.10). The one-pass
# kernels launch through torch.library.wrap_triton, which takes no such option: they keep Triton's default.
FP_FUSION = True

# Read once, when the kernels are defined: that is when Triton decides to interpret them.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ---------------------------------------------------------------------------------------------------------
# Device-side helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def dot_operand(x, OPERAND: tl.constexpr, COMPUTE: tl.constexpr, ROUND_TF32: tl.constexpr):
    """Round ``x`` to what the tensor cores will use. tf32 operands are rounded to nearest here (a tensor
    core would otherwise just drop the low 13 mantissa bits, a bias that adds up in long sums); the
    hardware's truncation is then exact. On a GPU ``COMPUTE == OPERAND``; under the interpreter (whose
    bf16/fp16 ``tl.dot`` is wrong and which ignores ``input_precision``) ``COMPUTE`` is fp32, so the same
    rounding happens and the product runs in fp32: the interpreter sees the GPU's operands."""
    x = x.to(OPERAND).to(COMPUTE)
    if ROUND_TF32:
        x = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


# Pointer offsets (row * D + column) are formed in int64 in every kernel: V*d or N*d can pass 2^31
# (V=256k, d=8192), where int32 offsets would wrap.


@triton.jit
def row_descriptor(ptr, n_rows, D, row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor descriptor over a (n_rows, D) row-major operand, loaded in BLOCK_ROWS x BLOCK_K blocks;
    out-of-range parts of a block read as zeros."""
    return tl.make_tensor_descriptor(ptr, shape=[n_rows, D], strides=[row_stride, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_K])


@triton.jit
def split_tiles(split, tiles_per_split, V, BLOCK_V: tl.constexpr):
    """The vocabulary tiles [first, last) that vocabulary split ``split`` streams."""
    first = split * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))


@triton.jit
def grouped_tile(pid, n_row_blocks, n_vocab_blocks, GROUP_M: tl.constexpr):
    """Map a linear program id to (row block, vocabulary block), GROUP_M row blocks at a time.

    Programs that run together then share GROUP_M row blocks and a few vocabulary blocks: operand tiles
    are reused from L2, and the atomic adds into grad_input / grad_weight / moments are spread over
    GROUP_M row blocks and as many vocabulary blocks instead of piling onto one row or one column block.
    """
    per_group = GROUP_M * n_vocab_blocks
    group = pid // per_group
    first_row_block = group * GROUP_M
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % per_group) % group_rows
    vocab_block = (pid % per_group) // group_rows
    return row_block, vocab_block


@triton.jit
def add_logit_chunk(z, h_desc, w, row0, k0, ACC: tl.constexpr, OPERAND: tl.constexpr, COMPUTE: tl.constexpr,
                    PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """One K step of the logit GEMM: ``z + h[row0:, k0:k0+BLOCK_K] @ w^T``, with ``w`` the K chunk of W's tile as
    loaded (kernels that fuse other products with W into the same K loop load each chunk once and pass it)."""
    h = dot_operand(h_desc.load([row0, k0]), OPERAND, COMPUTE, ROUND_TF32)
    w = dot_operand(w, OPERAND, COMPUTE, ROUND_TF32)
    return tl.dot(h, tl.trans(w), z, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def finish_logits(z, b_ptr, cols, V, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Adds the bias to a logit tile; columns >= V become -inf (probability 0)."""
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(ACC)[None, :]
    return tl.where(cols[None, :] < V, z, float("-inf"))


@triton.jit
def logit_tile(h_desc, w_desc, b_ptr, row0, col0, V, D, cols, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
               OPERAND: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """``z[BLOCK_M, BLOCK_V] = h[row0:] @ W[col0:]^T (+ b)`` in ``ACC``; columns >= V are -inf."""
    z = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        z = add_logit_chunk(z, h_desc, w_desc.load([col0, k0]), row0, k0, ACC, OPERAND, COMPUTE, PRECISION,
                            ROUND_TF32)
    return finish_logits(z, b_ptr, cols, V, HAS_BIAS, ACC)


@triton.jit
def row_probabilities(z, lse_ptr, rows, N):
    """``s = exp(z - lse)`` for a logit tile of ``rows``. Rows past N get lse = +inf: their z (the bias alone)
    then gives probabilities 0 without overflowing exp."""
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=float("inf"))
    return tl.exp(z - lse[:, None])


@triton.jit
def pick_target(z, cols, target):
    """Per row, ``z[row, target - col0]`` if the target lies in this tile's columns, else 0."""
    return tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)


@triton.jit
def philox_sign_block(seed, rows, cols, D):
    """The +-1 signs of dropreg.signs for elements (rows x cols) of an (N, D) input, as fp32.

    Element i = row * D + col uses Philox counter i // 128, word (i // 32) % 4 and bit i % 32; a set bit
    is -1. The counter is 64-bit, so huge N * D stay on the same stream."""
    flat = rows.to(tl.int64)[:, None] * D + cols.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, flat // 128)
    which = (flat // 32) % 4
    word = tl.where(which == 0, r0, tl.where(which == 1, r1, tl.where(which == 2, r2, r3)))
    bit = (word.to(tl.uint32, bitcast=True) >> (flat % 32).to(tl.uint32)) & 1
    return 1.0 - 2.0 * bit.to(tl.float32)


@triton.jit
def online_softmax_update(running_max, running_sum, z):
    """Absorb a logit tile into (max, sum of exp); returns the new pair, the rescale factor and the
    exp tile ``e^{z - new_max}`` (rows whose logits so far are all -inf keep a shift of 0)."""
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    e = tl.exp(z - shift[:, None])
    return new_max, running_sum * rescale + tl.sum(e, axis=1), rescale, e


# ---------------------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------------------

TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of one kernel. ``block_k`` is also the d-chunk of the epilogue
    GEMMs (one descriptor block shape per operand)."""
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


@dataclass(frozen=True)
class DotTypes:
    """How each class of ``tl.dot`` rounds its operands, as kernel constexprs.

    "Narrow" dots are the cross-entropy GEMMs (z = h W^T, G W, G^T h): operands in the input dtype.
    "Wide" dots are the regularizer GEMMs (moments s W, s W*W; t = T W^T + gR'q (W*W)^T; S^T T, S^T gR'q):
    docs/math.md's GEMM-friendly form subtracts nearly equal sums there (var = m2 - mu^2, r_v = ... - 2 W.q mu
    + ...), which bf16 operands (8 bits) ruin on peaked softmaxes. They run on fp32 operands: tf32x3 for bf16
    and fp16 inputs (single tf32, 11 bits, still loses to the cancellation: W*W of a bf16 W has 16 bits, and
    T = gI' u - 2 gR' q mu cancels against gR' q W*W at the dominant class); for fp32 inputs
    whatever torch.get_float32_matmul_precision() allows; fp64 stays fp64. tf32 operands are rounded to nearest in ``dot_operand`` (the PTX has no
    cvt.rna.tf32 of its own: the tensor cores would truncate)."""
    acc: object  # accumulation dtype: fp32, or fp64 for fp64 inputs
    operand: object  # narrow operands
    compute: object  # what a narrow tl.dot runs in (== operand on a GPU; fp32 under the interpreter)
    precision: Optional[str]  # narrow input_precision (fp32 operands only)
    wide: object  # wide operands (fp32 or fp64)
    wide_precision: Optional[str]

    def narrow_args(self) -> dict:
        return dict(ACC=self.acc, OPERAND=self.operand, COMPUTE=self.compute, PRECISION=self.precision,
                    ROUND_TF32=self.precision == "tf32")

    def wide_args(self) -> dict:
        return dict(WIDE=self.wide, WIDE_PRECISION=self.wide_precision, WIDE_ROUND_TF32=self.wide_precision == "tf32")


# Per kernel and dot class: "half" (bf16 or fp16 operands; tf32x3 regularizer dots, which need more
# registers), "tf32" (fp32 operands on tf32 tensor cores) and "ieee" (exact fp32 or fp64 dots: FMA units, no
# tensor cores, so smaller tiles). Every entry compiles without spills and within sm_80's shared memory
# (tools/compile_report.py). None is timed for these kernels: the one H100 session's tile sweep
# (docs/gpu/h100/tile_sweep.md) timed bf16 tiles when the regularizer dots were single tf32, and those tiles
# spill with tf32x3. Under the interpreter a single small config is used so that tiny test shapes still span
# several tiles in every dimension.
GPU_CONFIGS: dict[str, dict[str, TileConfig]] = {
    #                 (block_m, block_v, block_k, warps, stages)
    "lse_partials": dict(half=TileConfig(128, 128, 64, 8, 3), tf32=TileConfig(64, 128, 32, 8, 3),
                         ieee=TileConfig(32, 64, 16, 4, 2)),
    "moments": dict(half=TileConfig(64, 64, 16, 8, 2), tf32=TileConfig(64, 64, 32, 4, 2),
                    ieee=TileConfig(32, 64, 16, 4, 2)),
    "logit_gradient": dict(half=TileConfig(64, 128, 16, 8, 2), tf32=TileConfig(64, 64, 32, 8, 2),
                           ieee=TileConfig(32, 64, 16, 4, 2)),
    "rdrop_partials": dict(half=TileConfig(128, 64, 64, 8, 3), tf32=TileConfig(64, 64, 32, 4, 3),
                           ieee=TileConfig(32, 64, 16, 8, 2)),
    "rdrop_gradient": dict(half=TileConfig(64, 128, 32, 8, 2), tf32=TileConfig(64, 128, 16, 8, 2),
                           ieee=TileConfig(32, 64, 16, 4, 2)),
    "row_terms": dict(half=TileConfig(16, 1, 64, 4, 1), tf32=TileConfig(16, 1, 64, 4, 1),
                      ieee=TileConfig(16, 1, 64, 4, 1)),
}
INTERPRETER_CONFIG = TileConfig(16, 32, 16, 1, 1, group_m=2)
INTERPRETER_ROW_CONFIG = TileConfig(8, 1, 16, 1, 1)
INTERPRETER_VOCAB_SPLITS = 2  # split even tiny vocabularies so the exact merge is always exercised


# Per compute capability (>= 90) overrides of GPU_CONFIGS, for tiles that are faster on an H100 but spill on
# sm_80. Empty: the one measured override (128x128 logit-gradient tiles) was for single-tf32 regularizer dots.
SM90_CONFIGS: dict[str, dict[str, TileConfig]] = {}
# What a plan for a non-CUDA device (the compile report's meta tensors) assumes: an H100 (sm_90, 132 SMs).
REPORT_CAPABILITY = 90
REPORT_SM_COUNT = 132


@dataclass(frozen=True)
class LaunchPlan:
    """Every launch choice that is not a kernel argument, for one input dtype on one device: how the dots
    round (``types``), each kernel's tiles (``tiles``, by the names of ``GPU_CONFIGS``) and how many
    vocabulary splits the statistics passes use. :func:`launch_plan` makes the launchers' default one; tools
    and tests that try other tiles pass a modified copy (:meth:`with_tiles`) to the launchers."""
    types: DotTypes
    tiles: Mapping[str, TileConfig]
    sm_count: int  # the statistics grid aims at 4 programs per SM
    fixed_vocab_splits: Optional[int] = None  # the interpreter's rule, instead of filling the SMs

    def tile(self, kernel: str) -> TileConfig:
        return self.tiles[kernel]

    def with_tiles(self, **tiles: TileConfig) -> "LaunchPlan":
        unknown = set(tiles) - set(self.tiles)
        if unknown:
            raise ValueError(f"tiles: unknown kernels {sorted(unknown)}; expected some of {sorted(self.tiles)}")
        return dataclasses.replace(self, tiles={**self.tiles, **tiles})

    def vocab_splits(self, n_row_blocks: int, n_vocab_blocks: int) -> int:
        """How many vocabulary ranges the statistics pass runs in parallel: enough programs to fill the GPU
        (4 per SM) when there are few row blocks, merged exactly afterwards."""
        if self.fixed_vocab_splits is not None:
            return min(self.fixed_vocab_splits, n_vocab_blocks)
        return max(1, min(n_vocab_blocks, triton.cdiv(4 * self.sm_count, n_row_blocks)))


def launch_plan(dtype: torch.dtype, device: Optional[torch.device] = None, *,
                interpreter_tiles: bool = INTERPRETED, capability: Optional[int] = None,
                sm_count: Optional[int] = None) -> LaunchPlan:
    """The plan for ``dtype`` on ``device``: the interpreter's small tiles when ``interpreter_tiles``, else the
    GPU table for the dot class, with the overrides of the device's compute capability (``capability``,
    default the device's, or ``REPORT_CAPABILITY`` off CUDA). ``sm_count`` defaults likewise."""
    types = dot_types(dtype)
    if interpreter_tiles:
        tiles = {kernel: INTERPRETER_ROW_CONFIG if kernel == "row_terms" else INTERPRETER_CONFIG
                 for kernel in GPU_CONFIGS}
        return LaunchPlan(types, tiles, REPORT_SM_COUNT, fixed_vocab_splits=INTERPRETER_VOCAB_SPLITS)
    if dtype in (torch.bfloat16, torch.float16):
        dot_class = "half"
    elif dtype == torch.float32 and types.precision == "tf32":
        dot_class = "tf32"
    else:
        dot_class = "ieee"
    on_cuda = device is not None and device.type == "cuda"
    if capability is None:
        capability = _capability(device) if on_cuda else REPORT_CAPABILITY
    if sm_count is None:
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if on_cuda else REPORT_SM_COUNT
    overrides = SM90_CONFIGS if capability >= 90 else {}
    tiles = {kernel: overrides.get(kernel, {}).get(dot_class, configs[dot_class])
             for kernel, configs in GPU_CONFIGS.items()}
    return LaunchPlan(types, tiles, sm_count)


def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_types(dtype: torch.dtype, interpreted: bool = INTERPRETED) -> DotTypes:
    """bf16/fp16 inputs: narrow dots on tensor cores in that dtype, wide dots in tf32x3. fp32 inputs: tf32
    when ``torch.get_float32_matmul_precision()`` allows it ("high"/"medium"), else exact ieee fp32.
    Accumulation follows dropreg/_policy.py: fp32, fp64 for fp64 inputs."""
    operand = TL_DTYPES[dtype]
    low_precision = dtype in (torch.bfloat16, torch.float16)
    acc = TL_DTYPES[accumulation_dtype(dtype)]
    compute = tl.float32 if interpreted and low_precision else operand
    fp32_precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    precision = fp32_precision if dtype == torch.float32 else None
    # The cancelling regularizer GEMMs need more than tf32's 11 significant bits for 16-bit inputs (W*W of a
    # bf16 W has 16; on peaked bf16 rows single tf32 erred up to 4.7x plain bf16 PyTorch's bound, seed
    # 2305268529 of tests/test_low_precision.py): tf32x3, three tf32 products, about fp32 accuracy.
    wide_precision = {torch.float64: None, torch.float32: fp32_precision, torch.bfloat16: "tf32x3",
                      torch.float16: "tf32x3"}[dtype]
    return DotTypes(acc, operand, compute, precision, acc, wide_precision)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def descriptor_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` (2-D) with unit inner stride, a 16-byte aligned base and row stride: what a tensor
    descriptor (TMA) needs. Copies into a row-padded buffer only when ``t`` is not already so (odd d)."""
    if t is None:
        return None
    # Storage bases from torch's allocators are at least 64-byte aligned, so the offset decides (and no
    # data_ptr() call, which fake tensors under torch.compile do not allow).
    size = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and (t.storage_offset() * size) % 16 == 0:
        return t
    buffer = aligned_empty(t.shape[0], t.shape[1], t.dtype, t.device)
    buffer.copy_(t)
    return buffer


def aligned_empty(rows: int, dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized (rows, dim) view whose row stride is a multiple of 16 bytes (descriptor-ready)."""
    per_row = 16 // torch.empty((), dtype=dtype).element_size()
    padded_dim = triton.cdiv(max(dim, 1), per_row) * per_row
    return torch.empty(rows, padded_dim, dtype=dtype, device=device)[:, :dim]


def merge_vocab_splits(max_parts: torch.Tensor, sum_parts: torch.Tensor, *weighted_parts: torch.Tensor):
    """Exact merge of online-softmax partials from disjoint vocabulary ranges (docs/math.md).

    ``max_parts, sum_parts`` are (splits, N): each range's running max m_s and L_s = sum e^{z - m_s};
    each of ``weighted_parts`` is (splits, N) with the same e^{z - m_s} weighting. Returns ``lse`` and
    each weighted part divided by the total sum (a softmax expectation)."""
    top = max_parts.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    scale = torch.exp(max_parts - shift)
    total = (sum_parts * scale).sum(dim=0)
    expectations = [(part * scale).sum(dim=0) / total for part in weighted_parts]
    return (shift + total.log(), *expectations)


def prepare_device(device: torch.device) -> None:
    """Tensor descriptors built inside a kernel need scratch memory from a Triton allocator on a GPU.

    Triton keeps the allocator in a context variable, so it is set on every launch: autograd runs the
    backward in its own thread, where an allocator set once in the forward's thread is not seen (seen on
    an H100: "Kernel requires a runtime memory allocation, but no allocator was set")."""
    if device.type != "cuda":
        return

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(allocate)
