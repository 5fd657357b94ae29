"""The C++ "cpu" backend: multi-tile paths, threads, determinism, the sign stream, op registration."""
import contextlib
import re
import subprocess
import sys

import pytest
import torch

import dropreg
from dropreg import cpu
from checks import RecordOps

pytestmark = [pytest.mark.cpu_only,
              pytest.mark.skipif(not cpu.is_available(), reason=f"C++ kernels unavailable: {cpu.unavailable_reason()}")]


def _problem(n, d, v, dtype=torch.float64, bias=True):
    h = torch.randn(n, d, dtype=dtype)
    w = torch.randn(v, d, dtype=dtype) / d**0.5
    b = torch.randn(v, dtype=dtype) if bias else None
    y = torch.randint(0, v, (n,))
    y[::7] = -100
    return h, w, b, y


def _values_and_grads(backend, h, w, b, y, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    out = dropreg.linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=leaves[2] if b is not None else None,
                                       backend=backend, **kwargs)
    (out.ce + 2 * out.explicit + 3 * out.implicit).backward()
    return [t.detach() for t in out] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(300, 5, 549), (257, 3, 256), (1, 7, 1000), (513, 1, 700)])
@pytest.mark.parametrize("options", [dict(), dict(explicit=False), dict(implicit=False),
                                     dict(explicit=False, implicit=False)], ids=["all", "no-explicit",
                                                                                "no-implicit", "ce-only"])
def test_multi_tile_matches_reference(shape, options):
    # Shapes cross the 256-row and 256-entry tile boundaries with tails; float64 makes the match tight.
    h, w, b, y = _problem(*shape)
    ours = _values_and_grads("cpu", h, w, b, y, p=0.3, seed=11, **options)
    ref = _values_and_grads("reference", h, w, b, y, p=0.3, seed=11, **options)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_frozen_weight_and_input_only_grads():
    h, w, b, y = _problem(40, 6, 300)
    h.requires_grad_()
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend="cpu", seed=1)
    out.loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    dropreg.linear_cross_entropy(h_ref, w, y, linear_bias=b, backend="reference", seed=1).loss.backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


@contextlib.contextmanager
def num_threads(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_with_threads(threads, h, w, b, y):
    with num_threads(threads):
        return _values_and_grads("cpu", h, w, b, y, p=0.2, seed=5)


def test_one_and_two_threads_agree_and_runs_are_bitwise_reproducible():
    h, w, b, y = _problem(600, 16, 1500, dtype=torch.float32)
    one = _run_with_threads(1, h, w, b, y)
    two = _run_with_threads(2, h, w, b, y)
    for a, c in zip(one, two):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=1e-6)
    again = _run_with_threads(2, h, w, b, y)
    for a, c in zip(two, again):
        assert torch.equal(a, c)


# (600, 6, 1100): 3 row blocks x 5 vocabulary tiles, tails in both; (40, 5, 100): one tile, so 3 and 4 threads
# are more threads than there is work for (idle threads must add nothing, e.g. zero grad_input partials).
THREAD_SHAPES = [(600, 6, 1100), (40, 5, 100)]


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=["3x5-tiles", "1-tile"])
def test_thread_counts_match_reference(threads, shape):
    h, w, b, y = _problem(*shape)
    with num_threads(threads):
        assert torch.get_num_threads() == threads
        ours = _values_and_grads("cpu", h, w, b, y, p=0.3, seed=8)
    reference = _values_and_grads("reference", h, w, b, y, p=0.3, seed=8)
    for a, r in zip(ours, reference):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def _rdrop_values_and_grads(backend, h, h2, w, b, y):
    leaves = [t.clone().requires_grad_() for t in (h, h2, w, b)]
    out = dropreg.rdrop_linear_cross_entropy(*leaves[:3], y, linear_bias=leaves[3], alpha=0.7, backend=backend)
    (out.ce1 + 2 * out.ce2 + 3 * out.kl).backward()
    return [t.detach() for t in out] + [t.grad for t in leaves]


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=["3x5-tiles", "1-tile"])
def test_rdrop_thread_counts_match_reference(threads, shape):
    h, w, b, y = _problem(*shape)
    h2 = h + 0.3 * torch.randn_like(h)
    with num_threads(threads):
        ours = _rdrop_values_and_grads("cpu", h, h2, w, b, y)
    for a, r in zip(ours, _rdrop_values_and_grads("reference", h, h2, w, b, y)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**64 - 1])
def test_cpp_sign_stream_is_bit_identical_to_python(seed):
    rows, dim = 7, 45  # 315 signs: three Philox counters, the last partly used
    cpp = torch.ops.dropreg.philox_signs(seed - 2**64 if seed >= 2**63 else seed, rows, dim)
    assert torch.equal(cpp, dropreg.philox_signs(seed, rows, dim))


def test_seeded_implicit_term_matches_other_backends():
    h, w, b, y = _problem(50, 9, 300)
    for seed in (3, 2**63 + 7):
        cpp = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=seed, backend="cpu", reduction="none")
        ref = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=seed, backend="torch", reduction="none")
        torch.testing.assert_close(cpp.implicit, ref.implicit, rtol=1e-12, atol=1e-14)


def _op_args(dtype=torch.float32, explicit=True, implicit=True, bias=True, signs=False, requires_grad=True):
    h, w, b, y = _problem(9, 4, 300, dtype=dtype, bias=bias)
    y = y.clamp(min=0)
    s = (torch.randint(0, 2, (9, 4)) * 2 - 1).to(dtype) if signs else None
    return [h.requires_grad_(requires_grad), w.requires_grad_(requires_grad),
            b.requires_grad_(requires_grad) if b is not None else None, y, s, 123, explicit, implicit]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("config", [dict(), dict(explicit=False), dict(implicit=False, bias=False),
                                    dict(explicit=False, implicit=False), dict(signs=True),
                                    dict(dtype=torch.float64)])
def test_opcheck(config, requires_grad):
    args = _op_args(**config, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.dropreg.linear_ce_forward.default, args)


def _fake(args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return [mode.from_tensor(a.detach()) if isinstance(a, torch.Tensor) else a for a in args], mode


@pytest.mark.parametrize("position,bad,message", [
    (0, torch.randn(9, 4, 1), "input must be 2-D"),
    (1, torch.randn(300, 5), "weight must be (V, d) with d=4"),
    (1, torch.randn(300, 4, dtype=torch.float64), "weight must have dtype torch.float32"),
    (2, torch.randn(299), "bias must have shape (300,)"),
    (3, torch.zeros(8, dtype=torch.int64), "target must have shape (9,)"),
    (3, torch.zeros(9, dtype=torch.int32), "target must have dtype torch.int64"),
    (4, torch.ones(9, 3), "signs must have shape (9, 4)"),
], ids=["input-3d", "weight-d", "weight-dtype", "bias-shape", "target-shape", "target-dtype", "signs-shape"])
def test_fake_forward_rejects_bad_arguments(position, bad, message):
    args = _op_args()
    args[position] = bad
    fake_args, mode = _fake(args)
    with mode, pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.dropreg.linear_ce_forward(*fake_args)
    fake_args, mode = _fake(_op_args())  # and the same call with good arguments goes through
    with mode:
        assert torch.ops.dropreg.linear_ce_forward(*fake_args)[4].shape == (9, 4)


def test_fake_backward_rejects_bad_gradients_and_statistics():
    h, w, b, y, s, seed, ne, ni = (a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args())
    out = torch.ops.dropreg.linear_ce_forward(h, w, b, y, s, seed, ne, ni)
    good = [*(torch.randn(9) for _ in range(3)), torch.randn(9, 4), h, w, b, y, s, seed, out[3], out[4], out[5], ne,
            ni, [True, True, True]]
    for position, bad, message in [(1, torch.randn(9, 1), "grad_quadratic must have shape (9,)"),
                                   (3, torch.randn(9, 3), "grad_mu must have shape (9, 4)"),
                                   (10, torch.randn(8), "lse must have shape (9,)"),
                                   (12, torch.randn(9, 3), "var must have shape (9, 4)"),
                                   (11, torch.randn(9, 4, dtype=torch.float64), "mu must have dtype torch.float32")]:
        args = list(good)
        args[position] = bad
        fake_args, mode = _fake(args)
        with mode, pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.dropreg.linear_ce_backward(*fake_args)


def test_fake_rdrop_rejects_inputs_of_different_shapes():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _rdrop_args()]
    args[1] = args[1][:, :3]
    fake_args, mode = _fake(args)
    with mode, pytest.raises(RuntimeError, match=re.escape("input2 must have shape (9, 4)")):
        torch.ops.dropreg.rdrop_forward(*fake_args)


def test_opcheck_backward_op():
    h, w, b, y, s, seed, ne, ni = _op_args()
    out = torch.ops.dropreg.linear_ce_forward(h.detach(), w.detach(), b.detach(), y, s, seed, ne, ni)
    grads = [torch.randn(9) for _ in range(3)]
    for grad_mu in (None, torch.randn(9, 4)):
        args = [*grads, grad_mu, h.detach(), w.detach(), b.detach(), y, s, seed, out[3], out[4], out[5], ne, ni,
                [True, True, True]]
        torch.library.opcheck(torch.ops.dropreg.linear_ce_backward.default, args)


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 300)

    def forward(self, x, y):
        hidden = torch.tanh(self.body(x))
        out = dropreg.linear_cross_entropy(hidden, self.head.weight, y, linear_bias=self.head.bias, p=0.2,
                                           seed=7, backend="cpu")
        return out.loss


def test_torch_compile_fullgraph_matches_eager():
    model = _TinyModel()
    x, y = torch.randn(4, 6, 8), torch.randint(0, 300, (4, 6))
    y[0, 0] = -100
    eager = model(x, y)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_auto_runs_the_cpp_ops_for_cpu_tensors():
    h, w, b, y = _problem(9, 4, 300, dtype=torch.float32)
    h.requires_grad_()
    with RecordOps() as ops:
        dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=1).loss.backward()  # backend="auto"
        dropreg.rdrop_linear_cross_entropy(h, h * 0.9, w, y, linear_bias=b).loss.backward()
    ours = [name for name in ops.names if name.startswith("dropreg")]
    assert ours == ["dropreg.linear_ce_forward.default", "dropreg.linear_ce_backward.default",
                    "dropreg.rdrop_forward.default", "dropreg.rdrop_backward.default"], ours


def test_jit_build_failure_is_a_clear_error(tmp_path):
    # A plain checkout whose C++ source does not compile: backend="cpu" must raise with the compiler
    # output, and backend="auto" must fall back with a warning naming it (never silently).
    script = f"""
import sys, warnings, torch
import dropreg, dropreg.cpu as cpu, dropreg._build as build
build.sources = lambda: [{str(tmp_path / 'broken.cpp')!r}]
sys.modules['dropreg._C'] = None  # pretend the prebuilt library is missing: import raises ImportError
h, w, y = torch.randn(3, 2), torch.randn(5, 2), torch.tensor([0, 1, 2])
try:
    dropreg.linear_cross_entropy(h, w, y, backend='cpu', seed=0)
    print('NO ERROR')
except cpu.BackendUnavailable as e:
    print('ERROR:', 'this_is_not_cpp' in str(e))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    from dropreg._dispatch import resolve_backend
    print('AUTO:', resolve_backend('auto', h.device)[0], any('unavailable' in str(c.message) for c in caught))
"""
    (tmp_path / "broken.cpp").write_text("this_is_not_cpp;\n")
    env = dict(__import__("os").environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "ERROR: True" in done.stdout, done.stdout + done.stderr
    assert "AUTO: torch True" in done.stdout, done.stdout + done.stderr
    assert "building the C++ CPU kernels" in done.stderr


# ---- R-Drop ops -------------------------------------------------------------------------------------
def _rdrop_args(bias=True, dtype=torch.float32):
    h, w, b, y = _problem(9, 4, 300, dtype=dtype, bias=bias)
    h2 = h + 0.1 * torch.randn_like(h)
    return [h.requires_grad_(), h2.requires_grad_(), w.requires_grad_(),
            b.requires_grad_() if b is not None else None, y.clamp(min=0)]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("config", [dict(), dict(bias=False), dict(dtype=torch.float64)])
def test_opcheck_rdrop(config, requires_grad):
    args = [a.detach().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in _rdrop_args(**config)]
    torch.library.opcheck(torch.ops.dropreg.rdrop_forward.default, args)
    h1, h2, w, b, y = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out = torch.ops.dropreg.rdrop_forward(h1, h2, w, b, y)
    grads = [torch.randn(9, dtype=h1.dtype) for _ in range(3)]
    torch.library.opcheck(torch.ops.dropreg.rdrop_backward.default,
                          [*grads, h1, h2, w, b, y, out[3], out[4], [True, True, True, b is not None]])


@pytest.mark.parametrize("shape", [(300, 5, 549), (1, 7, 1000)])
def test_rdrop_multi_tile_matches_reference(shape):
    h, w, b, y = _problem(*shape)
    h2 = h + 0.3 * torch.randn_like(h)
    ours = _rdrop_values_and_grads("cpu", h, h2, w, b, y)
    for a, r in zip(ours, _rdrop_values_and_grads("reference", h, h2, w, b, y)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_rdrop_compiles_fullgraph():
    w = torch.randn(300, 8, requires_grad=True)
    h1, h2, y = torch.randn(10, 8), torch.randn(10, 8), torch.randint(0, 300, (10,))

    def step(h1, h2):
        return dropreg.rdrop_linear_cross_entropy(h1, h2, w, y, backend="cpu").loss

    eager = step(h1, h2)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(h1, h2), eager)
