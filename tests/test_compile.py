"""torch.compile with the default Inductor backend, for the "torch" and "cpu" backends (the Triton ops need a GPU for
Inductor: tests/test_triton_gpu.py; the "reference" backend's materialized graph took Inductor over 7 minutes to
lower on this machine, so it is left out): values and gradients equal eager. Inductor generates and builds C++ for
the graph around the op (about a minute per compile on a busy 2-core machine), so there are few compiles here, each covering linear_cross_entropy and R-Drop."""
import pytest
import torch

import dropreg
from dropreg import cpu

pytestmark = pytest.mark.slow


class TinyModel(torch.nn.Module):
    """A body, then the fused head loss and R-Drop (two "passes" that differ by a scale) on its output."""

    def __init__(self, backend, seed):
        super().__init__()
        self.body = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.head = torch.nn.Linear(6, 40, dtype=torch.float64)
        self.backend, self.seed = backend, seed

    def forward(self, x, y):
        hidden = torch.tanh(self.body(x))
        out = dropreg.linear_cross_entropy(hidden, self.head.weight, y, linear_bias=self.head.bias, p=0.3,
                                           seed=self.seed, backend=self.backend)
        rdrop = dropreg.rdrop_linear_cross_entropy(hidden, 0.9 * hidden, self.head.weight, y,
                                                   linear_bias=self.head.bias, alpha=0.7, backend=self.backend)
        return out.ce + 2 * out.explicit + 3 * out.implicit + rdrop.ce1 + 2 * rdrop.ce2 + 3 * rdrop.kl


def _inputs():
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randint(0, 40, (3, 5))
    y[0, 0] = -100
    return x, y


def _loss_and_grads(model, x, y, rng_seed):
    torch.manual_seed(rng_seed)  # seed=None draws the signs' seed from torch's generator
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _assert_same(compiled, eager):
    for a, e in zip(compiled, eager):
        # float64: Inductor may fuse and reorder the elementwise ops around the fused op, nothing more
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


NEEDS_CPP = pytest.mark.skipif(not cpu.is_available(), reason="C++ kernels unavailable")


class TermsModel(torch.nn.Module):
    """The body and fused head of :class:`TinyModel`, returning ``(ce + explicit, implicit)`` apart."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.head = torch.nn.Linear(6, 40, dtype=torch.float64)
        self.backend = backend

    def forward(self, x, y):
        hidden = torch.tanh(self.body(x))
        out = dropreg.linear_cross_entropy(hidden, self.head.weight, y, linear_bias=self.head.bias, p=0.3,
                                           backend=self.backend)  # seed=None
        return out.ce + out.explicit, out.implicit


@pytest.mark.parametrize("backend", ["torch",
                                     pytest.param("cpu", marks=NEEDS_CPP)])
def test_inductor_with_seed_none(backend):
    """seed=None inside a graph draws the signs in the graph from torch's generator: no graph break (fullgraph for
    the C++ ops; the "torch" backend's chunk loops run eagerly anyway). The sign-free part and its gradients equal
    eager; the implicit term is reproducible under torch.manual_seed and changes with it (the draw is not baked
    into the graph as a constant)."""
    torch._dynamo.reset()
    model = TermsModel(backend)
    compiled_model = torch.compile(model, fullgraph=backend == "cpu")
    x, y = _inputs()

    def run(module, rng_seed):
        torch.manual_seed(rng_seed)
        module.zero_grad()
        sign_free, implicit = module(x, y)
        sign_free.backward()
        return [sign_free.detach(), implicit.detach()] + [p.grad.clone() for p in module.parameters()]

    first, again, other = run(compiled_model, 1234), run(compiled_model, 1234), run(compiled_model, 99)
    eager = run(model, 1234)
    _assert_same(first[:1] + first[2:], eager[:1] + eager[2:])
    assert torch.equal(first[1], again[1]) and not torch.equal(first[1], other[1])


@pytest.mark.parametrize("backend", ["torch",
                                     pytest.param("cpu", marks=NEEDS_CPP)])
def test_inductor_matches_eager_with_a_seed(backend):
    # The C++ ops have fake kernels, so with a seed the whole step is one Inductor graph.
    torch._dynamo.reset()
    model = TinyModel(backend, seed=7)
    x, y = _inputs()
    compiled = torch.compile(model, fullgraph=backend == "cpu")
    _assert_same(_loss_and_grads(compiled, x, y, 0), _loss_and_grads(model, x, y, 0))


class OptionsModel(TermsModel):
    """:class:`TermsModel`'s body and head with label smoothing and z-loss, capped or not: the loss options read the
    seed's signs outside the fused op (drawn eagerly: Inductor spent over four minutes on the Philox rounds)."""

    def __init__(self, softcap):
        super().__init__("torch")
        self.softcap = softcap

    def forward(self, x, y):
        out = dropreg.linear_cross_entropy(torch.tanh(self.body(x)), self.head.weight, y, linear_bias=self.head.bias,
                                           p=0.3, seed=5, label_smoothing=0.1, z_loss=0.01, softcap=self.softcap,
                                           backend=self.backend)
        return out.loss


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcap"])
def test_inductor_matches_eager_with_loss_options(softcap):
    torch._dynamo.reset()
    model = OptionsModel(softcap)
    x, y = _inputs()
    _assert_same(_loss_and_grads(torch.compile(model), x, y, 0), _loss_and_grads(model, x, y, 0))
