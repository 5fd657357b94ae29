"""Framework conventions: torch.autocast, torch.use_deterministic_algorithms and DTensor arguments."""

import pytest
import torch

import dropreg
from dropreg import _dispatch

CALLS = {
    "linear_cross_entropy": lambda h, w, b, y, **kw: dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=3,
                                                                                  **kw).loss,
    "ce_only": lambda h, w, b, y, **kw: dropreg.linear_cross_entropy(h, w, y, linear_bias=b, explicit=False,
                                                                     implicit=False, **kw).loss,
    "explicit_regularizer": lambda h, w, b, y, **kw: dropreg.explicit_regularizer(h, w, linear_bias=b, **kw),
    "rdrop": lambda h, w, b, y, **kw: dropreg.rdrop_linear_cross_entropy(h, h.flip(0), w, y, linear_bias=b,
                                                                         **kw).loss,
    "softmax_mean": lambda h, w, b, y, **kw: dropreg.softmax_mean(h, w, linear_bias=b, **kw).sum(),
    "site_regularizers": lambda h, w, b, y, **kw: sum(dropreg.site_regularizers(h, w, y, [h], linear_bias=b, seed=3,
                                                                                **kw)),
}
# Calls whose fp32 and bf16 versions legitimately differ beyond the final rounding (see the test).
_ROUNDED_INSIDE = ("rdrop", "site_regularizers")


def _leaves(dtype=torch.float32, n=7, d=6, v=300):
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, dtype=dtype) / d**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))
    y[2] = -100
    return h, w, b, y


@pytest.mark.cpu_only
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("call", list(CALLS))
def test_autocast_casts_operands_like_f_linear(call, backend):
    """Under autocast, fp32 parameters and activations are cast to bf16 (as F.linear casts them), the result is
    fp32 (as F.cross_entropy's is) and equals the same call on bf16 operands before its final rounding;
    gradients reach the fp32 leaves through the casts and equal the bf16 call's."""
    h, w, b, y = _leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = CALLS[call](h, w, b, y, backend=backend)
    assert ours.dtype == torch.float32
    ours.backward()
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (h, w, b)]
    same = CALLS[call](*low, y, backend=backend)
    assert same.dtype == (torch.bfloat16 if call == "softmax_mean" else torch.float32)  # losses are fp32, mu not
    same.backward()
    ours, same = float(ours.detach()), float(same.detach())
    assert abs(ours - same) <= 3 * 2**-8 * (abs(ours) + 1)  # the same value; bf16 rounds each term and their sum
    # R-Drop uses h twice: the bf16 call sums the two bf16 gradients in bf16, ours in fp32 after the casts. The site
    # terms multiply the site (fp32 here, bf16 in the bf16 call) by its gradient: they see h unrounded.
    tolerance = dict(rtol=2**-7, atol=2**-7 * float(h.grad.abs().max())) if call in _ROUNDED_INSIDE else \
        dict(rtol=0, atol=0)
    for leaf, bf16_leaf in zip((h, w, b), low):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, bf16_leaf.grad.float(), **tolerance)


@pytest.mark.parametrize("backend", ["torch", "cpu"] if torch.get_default_device().type == "cpu" else ["torch"])
def test_autocast_sample_targets_draws_what_the_bf16_call_draws(backend):
    h, w, b, _ = _leaves()
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        ours = dropreg.sample_targets(h, w, linear_bias=b, samples=3, seed=11, backend=backend)
    low = [t.detach().to(torch.bfloat16) for t in (h, w, b)]
    theirs = dropreg.sample_targets(low[0], low[1], linear_bias=low[2], samples=3, seed=11, backend=backend)
    assert torch.equal(ours, theirs)


def test_autocast_keeps_dropregs_accumulation_in_fp32():
    """dropreg's own matrix products run with autocast off: on bf16-rounded operands the result is the fp64 value to
    fp32 accuracy, not to bf16's (an autocast bf16 GEMM inside would miss by ~1e-2)."""
    h, w, b, y = _leaves(n=64, d=64, v=2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend="torch", seed=1).loss
    rounded = [t.detach().to(torch.bfloat16).double() for t in (h, w, b)]
    exact = dropreg.linear_cross_entropy(rounded[0], rounded[1], y, linear_bias=rounded[2], backend="reference",
                                         seed=1).loss
    assert abs(float(ours) - float(exact)) <= 1e-5 * abs(float(exact))


@pytest.mark.parametrize("backend", ["torch", "cpu", "chunked"])
def test_fp16_mixed_precision_step_with_grad_scaler(backend):
    """The fp16 recipe: fp32 parameters, autocast to fp16, torch.amp.GradScaler. The scaled loss (2^16 times the
    loss) back-propagates through the fused op without overflow, and the unscaled gradients are the fp32 step's to
    fp16 accuracy."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 500)
    x, y = torch.randn(32, 16), torch.randint(0, 500, (32,))
    params = [*body.parameters(), *head.parameters()]

    def loss(dtype):
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            return dropreg.linear_cross_entropy(torch.tanh(body(x)), head.weight, y, linear_bias=head.bias, p=0.3,
                                                seed=5, backend=backend).loss

    reference = torch.autograd.grad(loss(torch.float32), params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    value = loss(torch.float16)
    assert value.dtype == torch.float32
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    for ours, expected in zip((p.grad for p in params), reference):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-3 * float(expected.abs().max()))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no inf/NaN found: the step was taken and the scale kept
    assert float(loss(torch.float32).detach()) < float(value.detach())


def test_autocast_off_is_a_plain_call():
    h, w, b, y = _leaves(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not cast by autocast, nor here
        inside = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0).loss
    assert inside.dtype == torch.float64
    assert torch.equal(inside, dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0).loss)
    with pytest.raises(TypeError, match="linear_weight: expected input's dtype torch.float32"):
        dropreg.linear_cross_entropy(h.float(), w.bfloat16(), y)  # mixed dtypes outside autocast: still refused


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_deterministic_mode_routes_around_gpu_atomics(deterministic):
    cuda = torch.device("cuda")
    name, _ = _dispatch.resolve_backend("auto", cuda)
    assert name == "chunked"  # the GPU path has no atomics
    with pytest.raises(RuntimeError, match="backend: 'triton' is not deterministic on cuda tensors"):
        _dispatch.resolve_backend("triton", cuda)
    # The interpreter runs one program after another: CPU tensors are deterministic with every backend.
    assert _dispatch.resolve_backend("triton", torch.device("cpu"))[0] == "triton"


def test_deterministic_warn_only_warns_as_torch_does():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="backend: 'triton' is not deterministic on cuda tensors"):
            assert _dispatch.resolve_backend("triton", torch.device("cuda"))[0] == "triton"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_chunked_on_cuda_is_picked_and_triton_can_be_named_outside_deterministic_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    assert _dispatch.resolve_backend("auto", torch.device("cuda"))[0] == "chunked"
    assert _dispatch.resolve_backend("triton", torch.device("cuda"))[0] == "triton"


def test_auto_never_picks_the_one_pass_triton_backend():
    """"triton" is opt-in: measured slower than naive PyTorch on the one GPU run, it is used only when named."""
    for device in ("cpu", "cuda", "meta"):
        for candidate in _dispatch._AUTO_PREFERENCE.get(device, _dispatch._AUTO_FALLBACK):
            assert candidate != "triton", device


@pytest.mark.cpu_only
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "chunked"])
@pytest.mark.parametrize("call", list(CALLS))
def test_deterministic_mode_repeats_bit_for_bit(deterministic, backend, call):
    h, w, b, y = _leaves(n=300, d=8, v=700)
    runs = []
    for _ in range(2):
        for t in (h, w, b):
            t.grad = None
        value = CALLS[call](h, w, b, y, backend=backend)
        value.backward()
        runs.append([value.detach()] + [t.grad.clone() for t in (h, w, b)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist
    dist.destroy_process_group()


@pytest.mark.cpu_only
@pytest.mark.parametrize("which", ["input", "linear_weight", "target"])
def test_dtensor_arguments_get_a_clear_error(one_rank_group, which):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (1,))
    h, w, _, y = _leaves()
    args = dict(input=h, linear_weight=w, target=y)
    args[which] = DTensor.from_local(args[which], mesh, [Replicate()])
    with pytest.raises(TypeError, match=f"{which}: DTensor inputs are not supported yet"):
        dropreg.linear_cross_entropy(args["input"], args["linear_weight"], args["target"])
