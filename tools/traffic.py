"""Memory traffic outside the GEMMs of the chunked driver's training step, counted on meta tensors.

    python tools/traffic.py [--rows 8192 --dim 4096 --vocab 128256 --dtype bfloat16] [--markdown FILE]

The driver (dropreg/chunked.py) runs on ``meta`` tensors exactly as it would on a GPU: the CUDA block plan, the
Triton epilogues (their launches recorded, not run) and the GEMMs of dropreg/gemm.py with narrow operands and fp32
results. Every ATen call and every epilogue launch is counted:

- GEMMs (``mm``, ``addmm``, ...) are the floor's work: their multiply-adds are reported, their bytes are not counted.
- Views and ``empty`` allocations move nothing. Any other ATen call reads each distinct input tensor once and writes
  each output once (an expanded operand counts its distinct elements; a gather reads what it returns; a scatter touches
  what it scatters), as one kernel would.
- An epilogue launch reads and writes its tensor arguments as :data:`EPILOGUE_TRAFFIC` says, which follows the kernels'
  loops in dropreg/triton/epilogues.py.

Meta tensors have no values, so work that depends on them is counted as the data a language model gives makes
likely: a row's reference moving (only where its logits in a chunk rise more than the headroom, 48, above the first
logit or the reference it has, dropreg/rows.py ``reference_headroom``; then its program of 4 rows reads the chunk
again and its moments are rescaled) is counted as never happening, and the rows scattered into grad_W (the
dominant classes' and the targets') as all of distinct classes, the most they can cost. Each call is attributed to the innermost dropreg function
that made it. The design's irreducible traffic is printed
beside the count (:func:`irreducible_bytes`). Nothing here needs a GPU or Triton's compiler.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "mv", "addmv", "matmul"}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense"}
GATHERS = {"index", "index_select", "gather", "embedding"}  # read what they return
SCATTERS = {"index_add", "index_add_", "index_put", "index_put_", "scatter", "scatter_", "scatter_add",
            "scatter_add_", "index_copy", "index_copy_"}  # touch as much of ``self`` as they scatter

# (argument, reads, writes) per epilogue kernel: how often each tensor argument crosses DRAM. Arguments not listed
# (placeholders for absent options) move nothing.
EPILOGUE_TRAFFIC = {
    "softmax_chunk_kernel": dict(z_ptr=(1, 0), b_ptr=(1, 0), probs_ptr=(0, 1), max_ptr=(1, 1), sum_ptr=(1, 1),
                                 mass_ptr=(1, 1), rescale_out=(0, 1), top_p_out=(0, 1), top_col_out=(0, 1)),
    "gradient_chunk_kernel": dict(z_ptr=(1, 0), b_ptr=(1, 0), t_ptr=(1, 0), lse_ptr=(1, 0), row_const_ptr=(1, 0),
                                  g_ce_ptr=(1, 0), target_ptr=(1, 0), top_col_ptr=(1, 0), t_top_ptr=(1, 0),
                                  out_ptr=(0, 1), col_sums_out=(0, 1)),
    "rdrop_softmax_chunk_kernel": dict(z1_ptr=(1, 0), z2_ptr=(1, 0), b_ptr=(1, 0), max_ptr=(1, 1), sum_ptr=(1, 1),
                                       weighted_d_ptr=(1, 1)),
    "rdrop_gradient_chunk_kernel": dict(z1_ptr=(1, 0), z2_ptr=(1, 0), b_ptr=(1, 0), lse_ptr=(1, 0),
                                        expected_d_ptr=(1, 0), g_ce1_ptr=(1, 0), g_ce2_ptr=(1, 0),
                                        half_kl_ptr=(1, 0), target_ptr=(1, 0), out_ptr=(0, 1), col_sums_out=(0, 1)),
    "finish_moments_kernel": dict(moments_ptr=(1, 1), normalizer_ptr=(1, 1), w_ptr=(1, 0), exact_ptr=(1, 0),
                                  seen_ptr=(1, 0), top_col_ptr=(1, 0), scale_ptr=(1, 0), h_ptr=(1, 0), b_ptr=(1, 0),
                                  target_ptr=(1, 0), signs_ptr=(1, 0), lse_ptr=(1, 0), ce_out=(0, 1),
                                  quadratic_out=(0, 1), sign_term_out=(0, 1)),
    "sweep_rows_kernel": dict(h_ptr=(1, 0), w_ptr=(1, 0), b_ptr=(1, 0), target_ptr=(1, 0), top_ptr=(1, 0),
                              signs_ptr=(1, 0), mu_ptr=(1, 0), var_ptr=(1, 0), lse_ptr=(1, 0), g_ce_ptr=(1, 0),
                              g_r_ptr=(1, 0), g_i_ptr=(1, 0), g_i_target_ptr=(1, 0), g_mu_ptr=(1, 0),
                              row_const_out=(0, 1), stacked_out=(0, 1), g_r_q_out=(0, 1), t_top_out=(0, 1),
                              grad_h_out=(0, 1), values_out=(0, 1), scales_out=(0, 1)),
    "weight_gradient_kernel": dict(out_ptr=(0, 1), product_ptr=(1, 0), w_ptr=(1, 0), sq_ptr=(1, 0), order_ptr=(1, 0),
                                   class_starts_ptr=(1, 0), values_ptr=(1, 0), scales_ptr=(1, 0), h_ptr=(1, 0),
                                   signs_ptr=(1, 0)),
}
# Arguments read only at the rows index arguments name (gathers): (kernel, argument) -> ((index argument, the
# switches that must be on), ...); one row per index entry.
EPILOGUE_GATHERS = {
    ("finish_moments_kernel", "w_ptr"): (("top_col_ptr", ("HAS_TOP",)), ("target_ptr", ("has_terms",))),
    ("finish_moments_kernel", "b_ptr"): (("target_ptr", ("has_terms",)),),
    ("sweep_rows_kernel", "w_ptr"): (("target_ptr", ("NEED_IMPLICIT", "want_h")), ("top_ptr", ("HAS_TOP",))),
    ("sweep_rows_kernel", "b_ptr"): (("top_ptr", ("HAS_TOP", "want_w")),),
}
# Arguments that every chunk's launch is handed whole but reads only its own part of: each scattered row is read by
# the launch of the chunk holding its class, so the sweep reads them once (counted at the first launch).
EPILOGUE_SPLIT_OVER_CHUNKS = {("weight_gradient_kernel", arg)
                              for arg in ("order_ptr", "values_ptr", "scales_ptr", "h_ptr", "signs_ptr")}
# which argument a constexpr switches off (False: never read or written)
_COMMON_SWITCHES = {"HAS_BIAS": ("b_ptr",), "HAS_T": ("t_ptr",), "HAS_TARGET": ("g_ce_ptr", "target_ptr"),
                    "HAS_TOP": ("top_col_ptr", "t_top_ptr", "exact_ptr", "seen_ptr", "w_ptr"),
                    "WRITE_PROBS": ("probs_ptr", "mass_ptr"), "COL_SUMS": ("col_sums_out",), "SCALED": ("scale_ptr",)}
# per kernel, which argument a switch (a constexpr, or a runtime flag argument) turns off (False or 0: never read or
# written)
EPILOGUE_SWITCHES = {name: _COMMON_SWITCHES for name in EPILOGUE_TRAFFIC}
EPILOGUE_SWITCHES["finish_moments_kernel"] = dict(
    HAS_TOP=("top_col_ptr", "exact_ptr", "seen_ptr"), scaled=("scale_ptr",), has_bias=("b_ptr",),
    has_terms=("h_ptr", "target_ptr", "lse_ptr", "ce_out", "quadratic_out", "sign_term_out"),
    need_implicit=("signs_ptr",))
EPILOGUE_SWITCHES["sweep_rows_kernel"] = dict(
    has_bias=("b_ptr",), NEED_EXPLICIT=("var_ptr", "g_r_q_out"), NEED_IMPLICIT=("signs_ptr",),
    has_grad_mu=("g_mu_ptr",), HAS_TOP=("top_ptr", "t_top_out", "scales_out", "values_out"), want_h=("grad_h_out",),
    want_w=("values_out", "scales_out"))
EPILOGUE_SWITCHES["weight_gradient_kernel"] = dict(HAS_SQ=("w_ptr", "sq_ptr"),
                                                   has_scatter=("order_ptr", "class_starts_ptr", "values_ptr",
                                                                "scales_ptr"),
                                                   has_u=("h_ptr", "signs_ptr"))


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view addresses (a broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class Entry:
    calls: int = 0
    read: int = 0
    written: int = 0
    macs: int = 0  # GEMMs only


@dataclass
class Count:
    """Per (where, what): calls, bytes read and written; GEMM multiply-adds apart."""
    entries: dict = field(default_factory=lambda: defaultdict(Entry))

    def add(self, where: str, what: str, read: int = 0, written: int = 0, macs: int = 0):
        entry = self.entries[(where, what)]
        entry.calls += 1
        entry.read += read
        entry.written += written
        entry.macs += macs

    def bytes(self, gemm: bool = False) -> int:
        return sum(e.read + e.written for (_, what), e in self.entries.items() if (what in GEMMS) == gemm)

    def macs(self) -> int:
        return sum(e.macs for e in self.entries.values())


def caller() -> str:
    """``module.function`` of the innermost frame in the dropreg package (not merely under a folder of that name)."""
    import dropreg

    package = os.path.dirname(os.path.abspath(dropreg.__file__)) + os.sep
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(package):
            module = path[len(package):-3].replace(os.sep, ".")
            return f"{module}.{frame.name}"
    return "(outside dropreg)"


class AtenTraffic(TorchDispatchMode):
    """Counts every ATen call's bytes (GEMMs: multiply-adds) into ``count``."""

    def __init__(self, count: Count):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        if name in FREE or (schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                                   for r in schema.returns)):
            return out  # a view or an uninitialized allocation: no data moves
        where = caller()
        bound = dict(zip((a.name for a in schema.arguments), args))
        bound.update(kwargs)
        if name in GEMMS:
            a = next(bound[k] for k in ("mat1", "batch1", "self") if k in bound)
            b = next(bound[k] for k in ("mat2", "batch2", "vec", "other") if k in bound)
            self.count.add(where, name, macs=a.numel() * (b.shape[-1] if b.dim() > 1 else 1))
            return out
        read = written = 0
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        if name in GATHERS:
            read = sum(distinct_bytes(t) for t in outputs)
            read += sum(distinct_bytes(t) for k, v in bound.items() if k != "self"
                        for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor))
            written = sum(distinct_bytes(t) for t in outputs)
        elif name in SCATTERS:
            moved = [t for k, v in bound.items() if k not in ("self", "out")
                     for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            src = max((distinct_bytes(t) for t in moved), default=0)
            read = sum(distinct_bytes(t) for t in moved) + (src if name.startswith(("index_add", "scatter_add"))
                                                            else 0)
            written = src
        else:
            seen = set()  # one tensor passed twice (w * w) is read once
            for arg_name, value in bound.items():
                for t in tree_flatten(value)[0]:
                    if not isinstance(t, torch.Tensor) or id(t) in seen:
                        continue
                    seen.add(id(t))
                    overwritten = arg_name == "out" or (arg_name == "self" and name in ("copy_", "fill_", "zero_"))
                    if arg_name in mutated:
                        written += distinct_bytes(t)
                    if not overwritten:
                        read += distinct_bytes(t)
            if not mutated:
                written = sum(distinct_bytes(t) for t in outputs)
        self.count.add(where, name, read, written)
        return out


class EpilogueTraffic:
    """Stands in for the Triton epilogues' launcher: counts each launch's bytes (EPILOGUE_TRAFFIC), runs nothing."""

    def __init__(self, count: Count):
        self.count = count
        self.seen = weakref.WeakValueDictionary()  # id -> the tensors earlier launches were handed

    def __call__(self, kernel):
        count = self.count
        seen = self.seen
        name = kernel.__name__

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    traffic = EPILOGUE_TRAFFIC[name]
                    bound = dict(zip(kernel.arg_names, args))

                    def on(switch):  # a constexpr (keyword) or a runtime flag (an int argument)
                        value = kwargs.get(switch, bound.get(switch))
                        return value is None or bool(value)

                    off = {arg for switch, args_off in EPILOGUE_SWITCHES[name].items() if not on(switch)
                           for arg in args_off}
                    read = written = 0
                    for arg_name, value in bound.items():
                        if arg_name in off or arg_name not in traffic or not isinstance(value, torch.Tensor):
                            continue
                        reads, writes = traffic[arg_name]
                        size = distinct_bytes(value)
                        if (name, arg_name) in EPILOGUE_GATHERS:  # the rows its indices name, one per entry
                            size = sum(bound[index].numel() * distinct_bytes(value[0])
                                       for index, needs in EPILOGUE_GATHERS[name, arg_name]
                                       if all(on(switch) for switch in needs))
                        if (name, arg_name) in EPILOGUE_SPLIT_OVER_CHUNKS:
                            size = 0 if seen.get(id(value)) is value else size
                            seen[id(value)] = value
                        read += reads * size
                        written += writes * size
                    count.add(caller(), name, read, written)
                return launch

        return Launcher()


def run_step(dtype: torch.dtype, rows: int, dim: int, vocab: int, op: str, count: Count) -> None:
    """One forward+backward of ``op`` ("terms": cross entropy with both terms; "ce": cross entropy alone, gradients
    formed in the forward; "rdrop") with gradients for the input, the weight and the bias."""
    from dropreg import chunked, ops
    from dropreg.plan import BlockPlan, ce_chunks, default_chunks
    from dropreg.reducers import LOCAL
    from dropreg.triton.epilogues import TritonEpilogues

    cuda = torch.device("cuda")
    row_block, vocab_chunk = default_chunks(rows, vocab, dtype, cuda)
    ce_rows, ce_chunk = ce_chunks(rows, vocab, dtype, cuda)
    plan = BlockPlan(row_block=row_block, vocab_chunk=vocab_chunk, ce_row_block=ce_rows, ce_vocab_chunk=ce_chunk)
    passes = chunked.ChunkedPasses(plan, epilogues=TritonEpilogues(EpilogueTraffic(count)))

    def meta(*shape, dtype=dtype, grad=True):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad and dtype.is_floating_point)

    h, w, b, y = meta(rows, dim), meta(vocab, dim), meta(vocab), meta(rows, dtype=torch.int64)
    # the implicit term's signs as the public API hands them over, in the input's dtype (dropreg.rows.implicit_signs;
    # drawing them writes N x d: not counted)
    signs = meta(rows, dim, grad=False)
    with AtenTraffic(count):
        if op == "terms":
            out = ops.Terms.apply(h, w, b, y, signs, None, None, True, True, passes, LOCAL)
            ce, quadratic, sign_term = out[:3]
            torch.autograd.backward([ce, quadratic, sign_term], [torch.ones_like(ce)] * 3)
        elif op == "ce":
            row_weight = torch.ones(rows, dtype=torch.float32, device="meta")
            loss = ops.CrossEntropyWithGrads.apply(h, w, b, y, row_weight, None, (True, True, True), passes, None,
                                                   None, None)
            loss.sum().backward()
        elif op == "rdrop":
            h2 = meta(rows, dim)
            out = ops.RDrop.apply(h, h2, w, b, y, None, passes, LOCAL)
            torch.autograd.backward(list(out), [torch.ones_like(o) for o in out])
        else:
            raise ValueError(f"op: expected 'terms', 'ce' or 'rdrop', got {op!r}")


def irreducible_bytes(dtype: torch.dtype, rows: int, dim: int, vocab: int, op: str) -> dict[str, int]:
    """What the design cannot avoid outside its GEMMs, with fp32 logit chunks read once and the epilogue outputs
    written once in ``dtype``: the parts by name."""
    nv, vd, small = rows * vocab, vocab * dim, dtype.itemsize
    if op == "terms":
        return {"forward epilogue: Z read, P written": nv * (4 + small),
                "backward epilogue: Z and t read, G and S written": nv * (2 * 4 + 2 * small),
                "W*W formed once (W read, W*W written)": 2 * vd * small,
                "grad_W finished once (two fp32 products and W read, grad_W written)": vd * (2 * 4 + 2 * small)}
    if op == "ce":
        return {"epilogues: Z written by the GEMM is read twice, G written": nv * (2 * 4 + small)}
    if op == "rdrop":
        return {"forward epilogue: Z1, Z2 read": nv * 2 * 4,
                "backward epilogue: Z1, Z2 read, G1, G2 written": nv * 2 * (4 + small)}
    raise ValueError(op)


def report(dtype: torch.dtype, rows: int, dim: int, vocab: int, op: str) -> tuple[Count, str]:
    count = Count()
    run_step(dtype, rows, dim, vocab, op, count)
    gb = 1e9
    lines = [f"### {op}: N={rows}, d={dim}, V={vocab}, {str(dtype).replace('torch.', '')}, forward+backward", "",
             f"Outside the GEMMs: **{count.bytes() / gb:.1f} GB**; the design's irreducible "
             f"{sum(irreducible_bytes(dtype, rows, dim, vocab, op).values()) / gb:.1f} GB. "
             f"GEMM multiply-adds: {count.macs() / (rows * vocab * dim):.2f} NVd.", "",
             "| where | what | calls | read GB | written GB | share |", "|---|---|---:|---:|---:|---:|"]
    total = max(count.bytes(), 1)
    rows_out = sorted(((k, e) for k, e in count.entries.items() if k[1] not in GEMMS),
                      key=lambda ke: -(ke[1].read + ke[1].written))
    for (where, what), e in rows_out:
        if e.read + e.written < 1e-3 * total:
            continue
        lines.append(f"| {where} | {what} | {e.calls} | {e.read / gb:.2f} | {e.written / gb:.2f} | "
                     f"{(e.read + e.written) / total:.1%} |")
    small = sum(e.read + e.written for (_, what), e in rows_out if e.read + e.written < 1e-3 * total)
    lines.append(f"| (calls under 0.1% each) | | | | | {small / total:.1%} |")
    lines += ["", "Irreducible:", ""]
    lines += [f"- {part}: {value / gb:.1f} GB" for part, value in irreducible_bytes(dtype, rows, dim, vocab,
                                                                                     op).items()]
    return count, "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--ops", default="terms,ce,rdrop", help="comma-separated, of terms, ce, rdrop")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    text = ""
    for op in args.ops.split(","):
        text += report(dtype, args.rows, args.dim, args.vocab, op)[1] + "\n"
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
