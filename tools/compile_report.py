"""Ahead-of-time compilation report: every Triton kernel of dropreg, for sm_80 and sm_90, without a GPU.

    python tools/compile_report.py [--targets 80,90] [--configs bf16,fp32] [--markdown FILE]

The kernels are specialized exactly as a real launch would specialize them: the launchers of forward.py,
backward.py and rdrop.py run on ``meta`` tensors of a realistic LM shape (N=8192, d=4096, V=128256) with
a recording ``launch``, so block sizes, warps, stages, constexprs and argument specializations (16-byte
divisibility) are the ones the launcher chooses. The chunked driver's epilogues are recorded at that shape and at
the edge shapes of ``EDGE_SHAPES`` (one row, a last row block of one row, d=1, V=1, odd sizes), one launch per
specialization Triton's JIT would derive (:func:`jit_specialization`: an integer equal to 1 becomes a constant).
Each recorded launch is then compiled with ``triton.compile`` for the target. ptxas's own log gives registers and
spill bytes; Triton's metadata gives the shared memory; the PTX shows whether tensor-core instructions
(``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90) were emitted.

Exit status 1 on a compile error, any spill, or shared memory over the target's per-block limit.
Run it in a process where TRITON_INTERPRET is not set.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

# Per-block shared memory limits (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
TENSOR_CORE_INSTRUCTION = {80: "mma.sync", 90: "wgmma.mma_async"}
ROW_KERNELS = ("row_terms_kernel", "row_prep_kernel")  # O(N d) epilogues without a GEMM
# the chunked driver's: elementwise, between cuBLAS GEMMs
EPILOGUE_KERNELS = ("softmax_chunk_kernel", "gradient_chunk_kernel", "rdrop_softmax_chunk_kernel",
                    "rdrop_gradient_chunk_kernel", "finish_moments_kernel", "sweep_rows_kernel",
                    "weight_gradient_kernel")
REPORT_SHAPE = dict(rows=8192, dim=4096, vocab=128256)
CONFIGS = {
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),  # its regularizer GEMMs use tf32x3
    "fp32": (torch.float32, "highest"),  # the default: exact ieee fp32 dots
    "fp32-tf32": (torch.float32, "high"),  # torch.set_float32_matmul_precision("high")
    "fp64": (torch.float64, "highest"),
}


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Row:
    config: str
    kernel: str
    target: int
    grid: str
    meta: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    tensor_cores: Optional[bool] = None
    seconds: float = 0.0
    error: Optional[str] = None

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} spill bytes")
        if self.shared_bytes is not None and self.shared_bytes > SHARED_MEMORY_LIMIT[self.target]:
            found.append(f"shared memory {self.shared_bytes} B over the sm_{self.target} limit "
                         f"{SHARED_MEMORY_LIMIT[self.target]} B")
        return found


class Recorder:
    """Stands in for ``torch.library.wrap_triton``: records launches instead of running them."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, kernel):
        launches = self.launches

        class RecordingLauncher:  # kernel[grid](*args, **kwargs) appends a Launch
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append(Launch(kernel, tuple(grid), args, kwargs))

        return RecordingLauncher()


def record_launches(dtype: torch.dtype, rows: int, dim: int, vocab: int, plan=None) -> list[Launch]:
    """Every kernel launch of a full training step (both terms, all gradients, bias) and of R-Drop, with
    ``plan`` (default: the launchers' own choice for meta tensors, i.e. ``REPORT_CAPABILITY``)."""
    from dropreg._policy import accumulation_dtype
    from dropreg.triton import backward, forward, rdrop

    recorder = Recorder()

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    h, w, b, y = meta(rows, dim), meta(vocab, dim), meta(vocab), meta(rows, dtype=torch.int64)
    seed = 2**62 + 12345
    _, _, _, lse, mu, var = forward.linear_ce_forward(recorder, h, w, b, y, None, seed, True, True, plan)
    grads = [meta(rows, dtype=accumulation_dtype(dtype)) for _ in range(3)]
    backward.linear_ce_backward(recorder, *grads, None, h, w, b, y, None, seed, lse, mu, var,
                                True, True, True, True, True, plan)
    backward.linear_ce_backward(recorder, *grads, None, h, w, b, y, None, seed, lse, mu, var,
                                False, False, True, True, True, plan)
    h2 = meta(rows, dim)
    _, _, _, lse2, expected = rdrop.rdrop_forward(recorder, h, h2, w, b, y, plan)
    rdrop.rdrop_backward(recorder, *grads, h, h2, w, b, y, lse2, expected, True, True, True, True, plan)
    return recorder.launches


def jit_specialization(launch: Launch) -> tuple:
    """What Triton's JIT keys a compiled kernel on, as it derives it from the arguments: the constexprs, each
    integer argument's value when it is 1 (then a constant) or whether it is divisible by 16, each tensor's dtype
    (meta tensors are 16-byte aligned, as fresh CUDA allocations are)."""
    def argument(value, param):
        if isinstance(value, bool) or not isinstance(value, int):
            return str(value.dtype) if isinstance(value, torch.Tensor) else repr(value)
        if getattr(param, "do_not_specialize", False):  # @triton.jit(do_not_specialize=...): one code for all
            return "-"
        return "1" if value == 1 else ("16k" if value % 16 == 0 else "int")
    constexprs = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k.isupper() or k.startswith("num_")))
    params = getattr(launch.kernel, "params", [None] * len(launch.args))
    return launch.kernel.__name__, constexprs, tuple(argument(a, p) for a, p in zip(launch.args, params))


# Shapes besides the report's LM shape whose chunks reach the JIT's other specializations: a batch of one row, a last
# row block of one row, d = 1, V = 1, sizes neither 1 nor a multiple of 16. (rows, dim, vocab, row_block, vocab_chunk),
# blocks None: the CUDA driver's own choice.
EDGE_SHAPES = ((1, 64, 1000, None, None), (33, 8, 40, 16, 16), (5, 1, 1, None, None), (1, 4, 1, None, None),
               (7, 3, 37, 7, 16))


def record_chunked_launches(dtype: torch.dtype, rows: int, dim: int, vocab: int, row_block: Optional[int] = None,
                            vocab_chunk: Optional[int] = None) -> list[Launch]:
    """The Triton launches of the chunked driver (dropreg/chunked.py) for a training step with both terms, each alone
    (with mu's own gradient), cross entropy per row, softmax_mean, a vocabulary slice's passes and R-Drop, on meta
    tensors with the CUDA block plan (or the blocks given); one launch per :func:`jit_specialization`."""
    from dropreg import chunked, ops
    from dropreg.plan import BlockPlan
    from dropreg.reducers import LOCAL
    from dropreg.triton.epilogues import TritonEpilogues

    recorder = Recorder()
    default_rows, default_chunk = chunked.default_chunks(rows, vocab, dtype, torch.device("cuda"))
    passes = chunked.ChunkedPasses(BlockPlan(row_block=row_block or default_rows,
                                             vocab_chunk=vocab_chunk or default_chunk),
                                   epilogues=TritonEpilogues(recorder))

    def meta(*shape, dtype=dtype, grad=True):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad and dtype.is_floating_point)

    h, h2, w, b, y = meta(rows, dim), meta(rows, dim), meta(vocab, dim), meta(vocab), meta(rows, dtype=torch.int64)
    signs = meta(rows, dim, grad=False)  # in the input's dtype, as dropreg.rows.implicit_signs gives them
    for need in ((True, True), (False, False), (True, False), (False, True)):
        out = ops.Terms.apply(h, w, b, y, signs, None, None, *need, passes, LOCAL)
        outputs = out[:4] if any(need) else out[:3]  # mu's own gradient, where mu is formed
        torch.autograd.grad([o.sum() for o in outputs], (h, w, b))
    torch.autograd.grad(ops.SoftmaxMean.apply(h, w, b, passes, LOCAL).sum(), (h, w, b))
    with torch.no_grad():  # a vocabulary slice: its statistics alone, its sweep with the row-wise parts kept apart
        stats = passes.statistics(h, w, b, need_mu=True, need_m2=True)
        per_row = torch.empty(rows, dtype=stats.lse.dtype, device="meta")
        owned = torch.empty(rows, dtype=torch.bool, device="meta")
        passes.terms_sweep(h, w, b, y, owned, signs, stats.lse, stats.mu, stats.var, per_row, per_row, per_row,
                           None, True, True, (True, True, True), stats.extra)
    out = ops.RDrop.apply(h, h2, w, b, y, None, passes, LOCAL)
    torch.autograd.grad([o.sum() for o in out], (h, h2, w, b))
    return distinct(recorder.launches)


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per :func:`jit_specialization`, in first-seen order."""
    found = {}
    for launch in launches:
        found.setdefault(jit_specialization(launch), launch)
    return list(found.values())


def _record_for(capability: int, dtype: torch.dtype, shape: dict) -> list[Launch]:
    from dropreg.triton.utils import launch_plan

    launches = record_launches(dtype, **shape, plan=launch_plan(dtype, torch.device("meta"), capability=capability))
    # fp64 problems run the PyTorch epilogues by default (dropreg.chunked.epilogues_for), but the tests force the
    # Triton ones, so they are compiled too
    chunked = record_chunked_launches(dtype, **shape)
    for edge in EDGE_SHAPES:
        chunked += record_chunked_launches(dtype, *edge)
    return launches + distinct(chunked)


def _describe(launch: Launch) -> tuple[str, str]:
    kw = launch.kwargs
    name = launch.kernel.__name__
    if name == "logit_gradient_kernel":
        name += " (ce+explicit+implicit)" if kw.get("MODULATED") else " (ce only)"
    if name == "softmax_chunk_kernel":
        name += " (probabilities)" if kw.get("WRITE_PROBS") else " (lse only)"
    if name == "gradient_chunk_kernel":
        name += " (ce+explicit+implicit)" if kw.get("HAS_T") else " (ce only)"
    if name.startswith(EPILOGUE_KERNELS):  # which integer arguments the JIT specialized (to 1, or as multiples of 16)
        ints = [spec for spec in jit_specialization(launch)[2] if spec in ("1", "16k", "int")]
        name += f" [{','.join(ints)}]"
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K", "BLOCK_R", "BLOCK_C", "BLOCK_D")
                      if k in kw)
    stages = f" s{kw['num_stages']}" if "num_stages" in kw else ""
    return name, f"{blocks} w{kw.get('num_warps')}{stages}"


def compile_launch(launch: Launch, capability: int):
    """``triton.compile`` with the signature, constexprs and attributes a real launch would produce."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _ptxas_numbers(log: str) -> tuple[int, int]:
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    if not registers:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return max(registers), sum(spills)


def build_rows(config_names, targets, shape=REPORT_SHAPE, progress=print, kernels=None) -> list[Row]:
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    rows: list[Row] = []
    compiled_epilogues = set()  # (target, dtype, specialization): fp32 and fp32-tf32 share their epilogues
    for config in config_names:
        dtype, matmul_precision = CONFIGS[config]
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            # the launchers choose tiles per compute capability, so each target gets its own recording
            launches = {capability: _record_for(capability, dtype, shape) for capability in targets}
        finally:
            torch.set_float32_matmul_precision(previous)
        for index in range(len(launches[targets[0]])):
            for capability in targets:
                launch = launches[capability][index]
                name, meta = _describe(launch)
                if kernels and not any(k in name for k in kernels):
                    continue
                if launch.kernel.__name__ in EPILOGUE_KERNELS:
                    key = (capability, dtype, jit_specialization(launch))
                    if key in compiled_epilogues:
                        continue
                    compiled_epilogues.add(key)
                row = Row(config, name, capability, "x".join(map(str, launch.grid)), meta)
                start = time.perf_counter()
                log = io.StringIO()
                try:
                    with contextlib.redirect_stdout(log):
                        compiled = compile_launch(launch, capability)
                    row.registers, row.spill_bytes = _ptxas_numbers(log.getvalue())
                    row.shared_bytes = int(compiled.metadata.shared)
                    if launch.kernel.__name__ not in ROW_KERNELS + EPILOGUE_KERNELS:
                        row.tensor_cores = TENSOR_CORE_INSTRUCTION[capability] in compiled.asm["ptx"]
                except Exception as error:  # reported as a row and as a failure
                    row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
                row.seconds = time.perf_counter() - start
                rows.append(row)
                progress(f"  {config:9s} sm_{capability} {name:45s} {row.seconds:5.1f} s "
                         f"{'ERROR' if row.error else ''}")
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| config | kernel | target | grid | blocks (MxVxK), warps, stages | registers | spill bytes | "
             "shared memory (B) | tensor cores | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mma = "-" if r.tensor_cores is None else (TENSOR_CORE_INSTRUCTION[r.target] if r.tensor_cores else "no")
        status = "; ".join(r.problems()) or "ok"
        lines.append(f"| {r.config} | {r.kernel} | sm_{r.target} | {r.grid} | {r.meta} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes} | {mma} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: unset TRITON_INTERPRET; the interpreter does not compile", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",")]
    configs = args.configs.split(",")
    print(f"dropreg Triton compile report: N={REPORT_SHAPE['rows']} d={REPORT_SHAPE['dim']} "
          f"V={REPORT_SHAPE['vocab']}, configs {configs}, targets {['sm_%d' % t for t in targets]}")
    rows = build_rows(configs, targets, progress=lambda line: print(line, flush=True),
                      kernels=args.kernels.split(",") if args.kernels else None)
    table = markdown_table(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    failures = [(r, p) for r in rows for p in r.problems()]
    for r, problem in failures:
        print(f"FAIL {r.config} {r.kernel} sm_{r.target}: {problem}", file=sys.stderr)
    print(f"{len(rows)} compilations, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
