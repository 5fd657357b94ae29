"""The "triton" backend beyond the shared oracle suite: many tiles, split merges, the sign stream, fp32 dot
precision, registration and dispatch, allocations at an LM shape, and the ahead-of-time compile report.

Kernels run under TRITON_INTERPRET=1 (set in conftest.py) with 16x32 tiles, 16-wide K chunks and two
vocabulary splits, so the shapes here cover several row blocks, vocabulary tiles, K chunks and groups.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg
from conftest import load_tool
import dropreg.cpu
from checks import TERMS, seeded_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(n=45, d=37, vocab=150, dtype=torch.float64, bias=True):
    # d=37: rows are not 16-byte multiples (descriptor-ready copies); V=150: 5 vocabulary tiles of 32 split
    # 3 + 2; N=45: 3 row blocks of 16, so the grouped order (2 row blocks per group) has a partial group.
    h = torch.randn(n, d, dtype=dtype)
    w = torch.randn(vocab, d, dtype=dtype) / d**0.5
    b = torch.randn(vocab, dtype=dtype) if bias else None
    y = torch.randint(0, vocab, (n,))
    return h, w, b, y


def _run(backend, h, w, b, y, want=(True, True, True), **kwargs):
    leaves = [t.clone().requires_grad_(flag) if t is not None else None for t, flag in zip((h, w, b), want)]
    out = dropreg.linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=leaves[2], backend=backend,
                                       reduction="none", **kwargs)
    weights = [torch.randn(y.shape, dtype=torch.float64, generator=seeded_generator(i)).to(h.dtype)
               for i in range(3)]
    sum(((term * wt).sum() for term, wt in zip(out, weights))).backward()
    return [t.detach() for t in out[:3]] + [None if t is None or t.grad is None else t.grad for t in leaves]


def _assert_same(ours, reference, rtol):
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert (a is None) == (b is None), i
        if a is not None:
            scale = float(b.abs().max()) + 1e-30
            assert float((a - b).abs().max()) <= rtol * scale, f"output {i}: {float((a - b).abs().max()):.3e}"


@pytest.mark.parametrize("options", [dict(), dict(explicit=False), dict(implicit=False),
                                     dict(explicit=False, implicit=False)],
                         ids=["both", "implicit-only", "explicit-only", "ce-only"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_many_tiles_match_reference(options, bias):
    h, w, b, y = _problem(bias=bias)
    kwargs = dict(p=0.3, seed=99, **options)
    _assert_same(_run("triton", h, w, b, y, **kwargs), _run("reference", h, w, b, y, **kwargs), 1e-11)


@pytest.mark.parametrize("want", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["input-only", "weight-only", "bias-only"])
def test_only_requested_gradients(want):
    h, w, b, y = _problem(n=20, d=16, vocab=70)
    ours = _run("triton", h, w, b, y, want=want, p=0.2, seed=5)
    _assert_same(ours, _run("reference", h, w, b, y, want=want, p=0.2, seed=5), 1e-11)
    assert [g is not None for g in ours[3:]] == list(want)


def test_non_contiguous_and_strided_inputs():
    h, w, b, y = _problem(n=20, d=24, vocab=70)
    h_view = torch.stack([h, -h], dim=2).reshape(20, 48)[:, ::2]  # inner stride 2: copied to a descriptor-ready buffer
    w_view = torch.cat([w, torch.zeros(70, 8, dtype=w.dtype)], dim=1)[:, :24]  # row stride 32: used in place
    assert torch.equal(h_view, h) and torch.equal(w_view, w)
    assert not h_view.is_contiguous() and not w_view.is_contiguous()
    _assert_same(_run("triton", h_view, w_view, b, y, p=0.2, seed=5), _run("reference", h, w, b, y, p=0.2, seed=5),
                 1e-11)


def test_vocabulary_split_that_is_entirely_masked():
    # The bias masks the second split's vocabulary (-inf): its partial is (m=-inf, L=0) and must merge to
    # nothing, not to NaN.
    h, w, b, y = _problem(n=20, d=16, vocab=128)
    b[64:] = float("-inf")
    y = y % 64
    _assert_same(_run("triton", h, w, b, y, p=0.2, seed=1), _run("reference", h, w, b, y, p=0.2, seed=1), 1e-11)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**63 + 5, 2**64 - 1])
def test_seeded_signs_match_the_other_backends(seed):
    # 50 x 37 = 1850 signs: several Philox counters, words and partial rows; the kernels draw them with
    # tl.randint4x, the torch backend with dropreg.signs.
    h, w, b, y = _problem(n=50, d=37, vocab=40)
    ours = _run("triton", h, w, b, y, p=0.3, seed=seed)
    _assert_same(ours, _run("torch", h, w, b, y, p=0.3, seed=seed), 1e-11)
    flipped = _run("triton", h, w, b, y, p=0.3, seed=seed ^ 1)
    assert not torch.equal(ours[2], flipped[2])


def test_fp32_dot_precision_follows_torch_setting():
    h, w, b, y = _problem(n=20, d=64, vocab=70, dtype=torch.float32)
    exact = _run("reference", h.double(), w.double(), b.double(), y, p=0.3, seed=3)
    previous = torch.get_float32_matmul_precision()
    try:
        results = {}
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            results[precision] = _run("triton", h, w, b, y, p=0.3, seed=3)
    finally:
        torch.set_float32_matmul_precision(previous)

    def worst(ours):
        return max(float((a.double() - e).abs().max() / (e.abs().max() + 1e-30)) for a, e in zip(ours, exact))

    # ieee fp32 dots: fp32 rounding only. tf32 dots (operands rounded to 11 significant bits): clearly worse
    # than fp32, but within a few units of tf32's 2^-11.
    assert worst(results["highest"]) < 1e-5
    assert 1e-5 < worst(results["high"]) < 2e-3


def test_rdrop_many_tiles_match_reference():
    h, w, b, y = _problem()
    h2 = h + 0.3 * torch.randn_like(h)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (h, h2, w, b)]
        out = dropreg.rdrop_linear_cross_entropy(*leaves[:3], y, linear_bias=leaves[3], alpha=0.7, backend=backend,
                                                 reduction="none")
        (out.ce1 + 2 * out.ce2 + 3 * out.kl).sum().backward()
        results[backend] = [t.detach() for t in out] + [t.grad for t in leaves]
    _assert_same(results["triton"], results["reference"], 1e-11)


def test_empty_batch_launches_nothing_and_gives_zero():
    h = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    out = dropreg.linear_cross_entropy(h, w, y, backend="triton", seed=0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(w.grad == 0)
    rdrop = dropreg.rdrop_linear_cross_entropy(h, h, w, y, backend="triton")
    assert rdrop.loss.item() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("dtype,precision,rtol", [
    # about 8x the errors seen (fp64 8e-16, fp32 2.7e-7, tf32 3.7e-4, bf16 6.9e-3, fp16 6.2e-4)
    (torch.float64, "highest", 1e-11), (torch.float32, "highest", 2e-6), (torch.float32, "high", 3e-3),
    (torch.bfloat16, "highest", 4e-2), (torch.float16, "highest", 5e-3)],
    ids=["fp64-ieee", "fp32-ieee", "fp32-tf32", "bf16", "fp16"])
def test_gpu_tile_configs_under_the_interpreter(dtype, precision, rtol):
    """The block sizes, group size and vocabulary splits a GPU launch uses (not the small interpreter
    config), passed to the launchers as a plan, on a shape with tails in every dimension of them: N=130,
    d=70, V=300. Per-row terms and gradients (no coefficients) against float64 autograd of the reference."""
    from dropreg._policy import accumulation_dtype
    from dropreg.reference import reference_terms
    from dropreg.triton import ops, utils

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        # sm_count 4: 16 programs, so several vocabulary splits for 3 row blocks
        plan = utils.launch_plan(dtype, torch.device("cpu"), interpreter_tiles=False, sm_count=4)
        h, w, b, y = (t if t.dtype == torch.int64 else t.to(dtype) for t in _problem(130, 70, 300))
        explicit_coef, implicit_coef = dropreg.default_coefficients(0.3)
        upstream = [torch.randn(130, dtype=torch.float64) * c for c in (1.0, explicit_coef, implicit_coef)]
        terms, grads = ops.linear_ce_step(h, w, b, y, [g.to(accumulation_dtype(dtype)) for g in upstream], seed=11,
                                          plan=plan)
    finally:
        torch.set_float32_matmul_precision(previous)
    leaves = [t.double().requires_grad_() for t in (h, w, b)]
    exact = reference_terms(*leaves, y, None, 11, True, True)[:3]  # (ce, quadratic, sign_term); mu is the 4th
    exact_grads = torch.autograd.grad(sum((t * g).sum() for t, g in zip(exact, upstream)), leaves)
    _assert_same([t.double() for t in (*terms, *grads)], [t.detach() for t in (*exact, *exact_grads)], rtol)


@settings(max_examples=50, deadline=None, print_blob=True)  # exact property in float64: no false failures
@given(vocab=st.integers(1, 40), cuts=st.lists(st.integers(0, 40), max_size=5), scale=st.sampled_from([1.0, 1e4]),
       masked=st.booleans())
def test_split_merge_is_exact(vocab, cuts, scale, masked):
    """merge_vocab_splits over any partition of the vocabulary (empty and all -inf ranges included) equals
    logsumexp and the softmax expectation over the whole vocabulary."""
    from dropreg.triton.utils import merge_vocab_splits

    logits = torch.randn(3, vocab, dtype=torch.float64) * scale
    if masked:
        logits[:, : vocab // 2] = float("-inf")
    values = torch.randn(3, vocab, dtype=torch.float64)
    bounds = [0, *sorted(min(c, vocab) for c in cuts), vocab]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        z = logits[:, lo:hi]
        m = z.amax(1) if hi > lo else torch.full((3,), float("-inf"), dtype=torch.float64)
        e = torch.exp(z - torch.where(m == float("-inf"), 0.0, m)[:, None])
        parts.append((m, e.sum(1), (e * values[:, lo:hi]).sum(1)))
    lse, expected = merge_vocab_splits(*(torch.stack(p) for p in zip(*parts)))
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-13, atol=0)
    torch.testing.assert_close(expected, (torch.softmax(logits, 1) * values).sum(1), rtol=1e-12, atol=1e-14)


# ---- registration and dispatch ---------------------------------------------------------------------
def test_ops_are_registered_separately_with_the_cpu_schemas():
    dropreg.linear_cross_entropy(*_problem(n=2, d=2, vocab=3)[:2], torch.tensor([0, 1]), backend="triton", seed=0)
    dropreg.cpu.load()
    for name in ("linear_ce_forward", "linear_ce_backward", "rdrop_forward", "rdrop_backward"):
        ours = getattr(torch.ops.dropreg_triton, name).default._schema
        cpu = getattr(torch.ops.dropreg, name).default._schema
        assert [a.name for a in ours.arguments] == [a.name for a in cpu.arguments], name
        assert len(ours.returns) == len(cpu.returns), name


def test_auto_never_launches_triton_for_cpu_tensors():
    # Triton is usable here (interpreter), yet CPU tensors must go to the C++ ops. On CUDA tensors "auto"
    # runs the Triton ops: tests/test_triton_gpu.py::test_auto_runs_the_triton_ops_on_cuda_tensors.
    from checks import RecordOps
    h, w, b, y = _problem(n=5, d=4, vocab=30)
    with RecordOps() as ops:
        dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0)
    assert "dropreg.linear_ce_forward.default" in ops.names
    assert not any(name.startswith("dropreg_triton") for name in ops.names)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    code = ("import torch, dropreg\n"
            "h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])\n"
            "try:\n"
            "    dropreg.linear_cross_entropy(h, w, y, backend='triton', seed=0)\n"
            "except ValueError as e:\n"
            "    print('ERROR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR input:") and "TRITON_INTERPRET" in done.stdout, done.stdout


# ---- no N x V allocation -------------------------------------------------------------------------
class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_launchers_allocate_nothing_vocabulary_by_rows_at_lm_shape(dtype):
    # The real launchers (the code behind the registered ops), on meta tensors of the compile report's LM
    # shape, record every tensor they create. The logits would be N x V = 1.05e9 elements; the largest
    # buffer allowed is grad_weight (V x d = 5.3e8, fp32), and nothing may span both rows and vocabulary.
    compile_report = load_tool("compile_report")

    shape = compile_report.REPORT_SHAPE
    with _Allocations() as allocations:
        launches = compile_report.record_launches(dtype, **shape)
    assert {launch.kernel.__name__ for launch in launches} >= {
        "lse_partials_kernel", "moments_kernel", "row_terms_kernel", "row_prep_kernel", "logit_gradient_kernel",
        "rdrop_partials_kernel", "rdrop_gradient_kernel"}
    rows, vocab = shape["rows"], shape["vocab"]
    for op, size in allocations.shapes:
        assert not (rows in size and vocab in size), (op, size)
        assert torch.Size(size).numel() <= vocab * shape["dim"], (op, size)


# ---- ahead-of-time compilation for sm_80 / sm_90 -----------------------------------------------------
def test_compile_report_passes_for_sm80_and_sm90(tmp_path):
    """What CI runs: the report in its own process, without TRITON_INTERPRET. Fails on a compile error, a
    spill or shared memory over the limit; here we also require tensor cores in every GEMM kernel of the
    bf16, fp16 and tf32 configurations (exact fp32 and fp64 dots run on FMA units by design)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout
    # one process per target, side by side: compiling is single-threaded, and the machine has two cores
    runs = {target: subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "compile_report.py"),
                                      "--targets", target, "--markdown", str(tmp_path / f"sm{target}.md")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for target in ("80", "90")}
    rows = []
    for target, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
        rows += [line.split("|")[1:-1] for line in (tmp_path / f"sm{target}.md").read_text().splitlines()[2:]]
    # 5 configs x 8 kernel variants x 2 targets; the chunked driver's chunk epilogues (6 kernels, in their variants),
    # each in every integer specialization the edge shapes reach, and its 3 row kernels, for 4 dtypes (fp32 and
    # fp32-tf32 share theirs) x 2 targets
    compile_report = load_tool("compile_report")

    def base(row):
        return row[1].strip().split(" ")[0]

    one_pass = [r for r in rows if base(r) not in compile_report.EPILOGUE_KERNELS]
    epilogues = [r for r in rows if base(r) in compile_report.EPILOGUE_KERNELS]
    chunk_kernels = [r for r in epilogues if "_chunk_kernel" in r[1]]
    assert len(one_pass) == 5 * 8 * 2
    assert all(r[-2].strip() == "-" for r in epilogues)
    # the row count is not specialized (not listed); the chunk width is, to 1, multiples of 16 and the rest
    specializations = {r[1].strip().split("[")[1] for r in chunk_kernels}
    assert specializations == {"1]", "16k]", "int]"}
    # each variant (6 kernels, some in several constexpr variants) in each of the 3, for 4 dtypes x 2 targets
    per_spec = [sum(r[1].strip().endswith(spec) for r in chunk_kernels) for spec in sorted(specializations)]
    assert per_spec[0] == per_spec[1] == per_spec[2] and per_spec[0] % (4 * 2) == 0 and per_spec[0] >= 4 * 6 * 2
    row_kernels = {(base(r), r[0].strip(), r[2].strip()) for r in epilogues if "_chunk_kernel" not in r[1]}
    assert row_kernels == {(kernel, config, f"sm_{target}") for kernel in compile_report.EPILOGUE_KERNELS
                           if "_chunk_kernel" not in kernel for config in ("bf16", "fp16", "fp32", "fp64")
                           for target in (80, 90)}
    for config, kernel, target, *_, tensor_cores, status in (map(str.strip, r) for r in rows):
        assert status == "ok", (config, kernel, target, status)
        if kernel.split(" ")[0] in ("row_prep_kernel", "row_terms_kernel", *compile_report.EPILOGUE_KERNELS):
            continue  # elementwise
        if config in ("bf16", "fp16", "fp32-tf32"):
            assert tensor_cores in ("mma.sync", "wgmma.mma_async"), (config, kernel, target)
