"""The "triton" backend on a real CUDA GPU (skipped without one, so never in CI).

The interpreter suite proves the kernel source correct; these tests check what only hardware shows: the
compiled kernels with the launcher's GPU tile configs, tensor descriptors (TMA on sm_90), atomics,
tensor-core operand rounding, opcheck of the registered ops and torch.compile through them.
Run on a GPU machine as part of the whole suite: ``DROPREG_TEST_DEVICE=cuda python -m pytest -q`` (README.md, docs/verification.md).
"""
import os

import pytest
import torch

import dropreg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and compiled (not interpreted) Triton kernels")

# tolerance on max|ours - fp64 reference| / max|reference| per output: about 8x the errors the interpreter
# shows for the same operand rounding (tests/test_triton_backend.py::test_gpu_tile_configs_under_the_interpreter)
CASES = [(torch.float64, "highest", 1e-10), (torch.float32, "highest", 2e-5), (torch.float32, "high", 3e-3),
         (torch.bfloat16, "highest", 4e-2), (torch.float16, "highest", 5e-3)]
CASE_IDS = ["fp64", "fp32-ieee", "fp32-tf32", "bf16", "fp16"]


def _inputs(n, d, vocab, dtype, bias=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(vocab, d, device="cuda", generator=gen) / d**0.5).to(dtype)
    b = torch.randn(vocab, device="cuda", generator=gen).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    y[::7] = -100
    return h, w, b, y


def _run(fn, backend, tensors, **kwargs):
    leaves = [t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]
    out = fn(*leaves, backend=backend, reduction="none", **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(123)
    weights = [torch.randn(out[0].shape, device="cuda", generator=gen, dtype=torch.float64) for _ in out[:3]]
    sum((term.double() * wt).sum() for term, wt in zip(out[:3], weights)).backward()
    return [t.detach().double() for t in out[:3]] + [t.grad.double() for t in leaves
                                                     if t is not None and t.is_floating_point()]


def _worst(ours, exact):
    return max(float((a - e).abs().max() / e.abs().max().clamp_min(1e-30)) for a, e in zip(ours, exact)
               if a is not None and e.numel())


def _linear_ce(h, w, b, y, **kwargs):
    return dropreg.linear_cross_entropy(h, w, y, linear_bias=b, **kwargs)


def _rdrop(h1, h2, w, b, y, **kwargs):
    return dropreg.rdrop_linear_cross_entropy(h1, h2, w, y, linear_bias=b, **kwargs)


@pytest.mark.parametrize("dtype,precision,rtol", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(333, 256, 5000), (64, 100, 3001), (1, 8, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", [dict(), dict(explicit=False), dict(explicit=False, implicit=False)],
                         ids=["both", "implicit-only", "ce-only"])
def test_linear_ce_matches_fp64_reference(dtype, precision, rtol, shape, options):
    h, w, b, y = _inputs(*shape, dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = _run(_linear_ce, "triton", (h, w, b, y), p=0.3, seed=7, **options)
    finally:
        torch.set_float32_matmul_precision(previous)
    exact = _run(_linear_ce, "reference", (h.double(), w.double(), b.double(), y), p=0.3, seed=7, **options)
    worst = _worst(ours, exact)
    print(f"{dtype} {precision} {shape} {options}: worst relative error {worst:.2e}")
    assert worst <= rtol


@pytest.mark.parametrize("dtype,precision,rtol", CASES, ids=CASE_IDS)
def test_rdrop_matches_fp64_reference(dtype, precision, rtol):
    h, w, b, y = _inputs(333, 256, 5000, dtype)
    h2 = (h.float() + 0.3 * torch.randn_like(h.float())).to(dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = _run(_rdrop, "triton", (h, h2, w, b, y), alpha=0.7)
    finally:
        torch.set_float32_matmul_precision(previous)
    exact = _run(_rdrop, "reference", (h.double(), h2.double(), w.double(), b.double(), y), alpha=0.7)
    worst = _worst(ours, exact)
    print(f"rdrop {dtype} {precision}: worst relative error {worst:.2e}")
    assert worst <= rtol


@pytest.mark.parametrize("seed", [0, 2**40 + 12345, 2**64 - 1])
def test_seeded_signs_match_the_torch_backend_on_gpu(seed):
    h, w, b, y = _inputs(50, 37, 40, torch.float64)
    ours = _run(_linear_ce, "triton", (h, w, b, y), p=0.3, seed=seed)
    other = _run(_linear_ce, "torch", (h, w, b, y), p=0.3, seed=seed)
    assert _worst(ours, other) < 1e-11


def test_auto_runs_the_chunked_path_on_cuda_tensors():
    """backend="auto" on CUDA is the chunked driver (cuBLAS GEMMs with fp32 results, Triton epilogues), not the
    atomic Triton ops; naming backend="triton" still runs those."""
    from checks import RecordOps
    h, w, b, y = _inputs(20, 16, 70, torch.bfloat16)
    with RecordOps() as ops:
        dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0)  # backend="auto"
    assert not any(name.startswith("dropreg_triton") for name in ops.names), ops.names
    assert any(name.startswith("aten.mm.dtype") or name.startswith("aten.addmm.dtype") for name in ops.names), ops.names
    with RecordOps() as ops:
        dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0, backend="triton")
    assert "dropreg_triton.linear_ce_forward.default" in ops.names, ops.names


def test_opcheck_on_the_triton_ops():
    """Schemas, fake kernels (derived by triton_op), functionalization and AOT dispatch of all four ops.
    Inputs do not require grad: the backward ops have no autograd formula (no double backward), as the
    C++ ones; first-order autograd through torch.compile is test_torch_compile_through_the_triton_op."""
    import dropreg.triton
    dropreg.triton._ops()  # registers torch.ops.dropreg_triton.*
    h, w, b, y = _inputs(40, 64, 300, torch.float32)
    y = y.clamp_min(0)
    grads = [torch.randn(40, device="cuda") for _ in range(3)]
    ops = torch.ops.dropreg_triton
    torch.library.opcheck(ops.linear_ce_forward.default, (h, w, b, y, None, 5, True, True))
    _, _, _, lse, mu, var = ops.linear_ce_forward(h, w, b, y, None, 5, True, True)
    torch.library.opcheck(ops.linear_ce_backward.default,
                          (*grads, torch.randn_like(mu), h, w, b, y, None, 5, lse, mu, var, True, True,
                           [True, True, True]))
    torch.library.opcheck(ops.rdrop_forward.default, (h, h * 0.9, w, b, y))
    out = ops.rdrop_forward(h, h * 0.9, w, b, y)
    torch.library.opcheck(ops.rdrop_backward.default,
                          (*grads, h, h * 0.9, w, b, y, out[3], out[4], [True, True, True, True]))


def test_torch_compile_through_the_triton_op():
    h, w, b, y = _inputs(64, 128, 1000, torch.float32)

    def step(h, w):
        return dropreg.linear_cross_entropy(h, w, y, linear_bias=b, p=0.2, seed=3, backend="triton").loss

    eager_leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    eager = step(*eager_leaves)
    eager.backward()
    compiled_leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    compiled = torch.compile(step, fullgraph=True)(*compiled_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, e in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-6)


def test_lm_shape_runs_and_matches_streamed_fp32():
    """N=8192, d=4096, V=128256 in bf16: the compile report's shape, run for real."""
    h, w, b, y = _inputs(8192, 4096, 128256, torch.bfloat16, bias=False)
    ours = _run(_linear_ce, "triton", (h, w, None, y), p=0.1, seed=1)
    exact = _run(_linear_ce, "torch", (h.float(), w.float(), None, y), p=0.1, seed=1)
    worst = _worst(ours, exact)
    print(f"LM shape bf16 vs streamed fp32: worst relative error {worst:.2e}; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert all(torch.isfinite(t).all() for t in ours if t is not None)
    assert worst <= 4e-2


def test_every_site_ops_on_the_gpu_path():
    """softmax_mean and sample_targets on CUDA tensors ("auto" picks the GPU path, which runs the chunked
    PyTorch driver for them) against the float64 CPU reference; a site_regularizers step through a small net."""
    h, w, b, y = _inputs(300, 64, 5000, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    mu = dropreg.softmax_mean(leaves[0], leaves[1], linear_bias=leaves[2])
    mu.pow(2).sum().backward()
    cpu_leaves = [t.detach().cpu().requires_grad_() for t in (h, w, b)]
    ref = dropreg.softmax_mean(cpu_leaves[0], cpu_leaves[1], linear_bias=cpu_leaves[2], backend="reference")
    ref.pow(2).sum().backward()
    torch.testing.assert_close(mu.detach().cpu(), ref.detach(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(leaves, cpu_leaves):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-9, atol=1e-11)
    drawn = dropreg.sample_targets(h, w, linear_bias=b, samples=3, seed=2**63 + 5)
    assert torch.equal(drawn.cpu(), dropreg.sample_targets(h.cpu(), w.cpu(), linear_bias=b.cpu(), samples=3,
                                                           seed=2**63 + 5, backend="reference"))
    x = torch.randn(300, 64, device="cuda", dtype=torch.float64, requires_grad=True)
    hidden = torch.tanh(x)
    reg = dropreg.site_regularizers(hidden, w, y.clamp(min=0), [x], linear_bias=b, p=0.3, seed=7)
    (reg.explicit + reg.implicit).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
