"""Public API contract: shapes, dtypes, bad input, non-finite propagation, signs, gradcheck."""
import math

import pytest
import torch

import dropreg
from dropreg.signs import philox4x32, philox_signs


def small(dtype=torch.float64, lead=(4,), d=3, vocab=7, requires_grad=False):
    h = torch.randn(*lead, d, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(vocab, d, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(vocab, dtype=dtype, requires_grad=requires_grad)
    y = torch.randint(0, vocab, lead)
    return h, w, b, y


# ---- bad input: each case names the argument it is about ------------------------------------------
def _bad_cases():
    h, w, b, y = small()
    return [
        ("d mismatch", dict(input=torch.randn(4, 5, dtype=torch.float64)), ValueError, "input"),
        ("weight not 2-D", dict(linear_weight=w[None]), ValueError, "linear_weight"),
        ("bias shape", dict(linear_bias=b[:-1]), ValueError, "linear_bias"),
        ("target shape", dict(target=y[:-1]), ValueError, "target"),
        ("float target", dict(target=y.double()), TypeError, "target"),
        ("bool target", dict(target=y > 2), TypeError, "target"),
        ("target too large", dict(target=torch.full_like(y, 7)), ValueError, "target"),
        ("negative target", dict(target=torch.full_like(y, -1)), ValueError, "target"),
        ("p negative", dict(p=-0.1), ValueError, "p"),
        ("p one", dict(p=1.0), ValueError, "p"),
        ("p nan", dict(p=float("nan")), ValueError, "p"),
        ("p string", dict(p="0.1"), TypeError, "p"),
        ("negative explicit_coef", dict(explicit_coef=-1.0), ValueError, "explicit_coef"),
        ("inf implicit_coef", dict(implicit_coef=math.inf), ValueError, "implicit_coef"),
        ("signs not +-1", dict(signs=torch.full((4, 3), 0.5, dtype=torch.float64)), ValueError, "signs"),
        ("signs zero", dict(signs=torch.zeros(3, dtype=torch.float64)), ValueError, "signs"),
        ("signs not broadcastable", dict(signs=torch.ones(2, 3, dtype=torch.float64)), ValueError, "signs"),
        ("signs bool", dict(signs=torch.ones(4, 3, dtype=torch.bool)), TypeError, "signs"),
        ("weight dtype", dict(linear_weight=w.float()), TypeError, "linear_weight"),
        ("bias dtype", dict(linear_bias=b.float()), TypeError, "linear_bias"),
        ("integer input", dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "input"),
        ("weight on meta", dict(linear_weight=w.to("meta")), ValueError, "linear_weight"),
        ("target on meta", dict(target=y.to("meta")), ValueError, "target"),
        ("unknown reduction", dict(reduction="avg"), ValueError, "reduction"),
        ("unknown backend", dict(backend="cuda-magic"), ValueError, "backend"),
        ("seed negative", dict(seed=-1), ValueError, "seed"),
        ("seed float", dict(seed=1.5), TypeError, "seed"),
        ("seed string, implicit off", dict(seed="abc", implicit=False), TypeError, "seed"),
        ("seed negative, signs given", dict(seed=-5, signs=torch.ones(3, dtype=torch.float64)), ValueError, "seed"),
        ("signs string, implicit off", dict(signs="x", implicit=False), TypeError, "signs"),
        ("ignore_index beyond int64", dict(ignore_index=2**70), ValueError, "ignore_index"),
        ("backend not a string", dict(backend=["cpu"]), ValueError, "backend"),
        ("input not a tensor", dict(input=[[1.0, 2.0, 3.0]]), TypeError, "input"),
    ]


@pytest.mark.parametrize("label,override,error,argument", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_names_the_argument(label, override, error, argument):
    h, w, b, y = small()
    args = dict(input=h, linear_weight=w, target=y, linear_bias=b)
    args.update(override)
    with pytest.raises(error, match=rf"^{argument}:"):
        dropreg.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)


def test_module_constructors_refuse_bad_options():
    """At construction, not at the first forward."""
    for kwargs, argument in ((dict(p=2.0), "p"), (dict(reduction="bad"), "reduction"), (dict(backend="bad"), "backend")):
        with pytest.raises(ValueError, match=rf"^{argument}:"):
            dropreg.LinearCrossEntropyLoss(**kwargs)
    for kwargs, argument in ((dict(alpha=-1.0), "alpha"), (dict(reduction="bad"), "reduction")):
        with pytest.raises(ValueError, match=rf"^{argument}:"):
            dropreg.RDropLoss(**kwargs)


@pytest.mark.parametrize("p", [1.0, -1.0])
def test_default_coefficients_refuses_p_outside_0_1(p):
    with pytest.raises(ValueError, match="^p:"):
        dropreg.default_coefficients(p)


def test_philox_signs_refuses_seeds_and_streams_outside_their_words():
    with pytest.raises(ValueError, match="^seed:"):
        philox_signs(-1, 2, 3)
    with pytest.raises(ValueError, match="^stream:"):
        philox_signs(0, 2, 3, stream=2**32)


@pytest.mark.parametrize("module", ["LinearCrossEntropyLoss", "RDropLoss"])
def test_shift_labels_widens_narrow_integer_labels(module):
    """uint8 labels cannot hold the padding's ignore_index (-100): shift_labels widens them to int64."""
    h, w, _, _ = small(dtype=torch.float32, lead=(2, 5))
    labels = torch.randint(0, 7, (2, 5), dtype=torch.uint8)
    loss_fn = getattr(dropreg, module)(shift_labels=True)
    inputs = (h,) if module == "LinearCrossEntropyLoss" else (h, h + 0.01)
    seeded = dict(seed=0) if module == "LinearCrossEntropyLoss" else {}
    ours = loss_fn(*inputs, w, labels, **seeded).loss
    assert torch.equal(ours, loss_fn(*inputs, w, labels.long(), **seeded).loss)


def test_explicit_regularizer_bad_input():
    h, w, b, _ = small()
    with pytest.raises(ValueError, match="^input:"):
        dropreg.explicit_regularizer(h[:, :2], w)
    with pytest.raises(ValueError, match="^reduction:"):
        dropreg.explicit_regularizer(h, w, reduction="mean-ish")


def test_ignore_index_is_accepted_outside_the_vocabulary():
    h, w, b, y = small()
    y[0] = 12345
    out = dropreg.linear_cross_entropy(h, w, y, ignore_index=12345, seed=0)
    assert torch.isfinite(out.loss)


# ---- outputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shapes_and_dtypes(reduction, dtype):
    h, w, b, y = small(dtype=dtype, lead=(2, 5))
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, seed=1)
    expected = (2, 5) if reduction == "none" else ()
    for term in (*out, out.loss):
        assert term.shape == expected and term.dtype == torch.float32  # bf16 inputs: fp32 losses, as HF's


def test_empty_batch_gives_zero():
    h, w, b, y = small(lead=(0,), requires_grad=True)
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, seed=0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_explicit_regularizer_is_the_uncoefficiented_term(backend):
    h, w, b, y = small(lead=(3, 2))
    per_row = dropreg.explicit_regularizer(h, w, linear_bias=b, reduction="none", backend=backend)
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, p=0.2, reduction="none", implicit=False,
                                       backend=backend)
    coef = dropreg.default_coefficients(0.2)[0]
    torch.testing.assert_close(coef * per_row, out.explicit)
    torch.testing.assert_close(dropreg.explicit_regularizer(h, w, linear_bias=b, backend=backend), per_row.mean())
    assert per_row.shape == (3, 2) and torch.all(per_row >= 0)


# ---- non-finite inputs propagate ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_give_non_finite_outputs(backend, where, bad):
    h, w, b, y = small(dtype=torch.float32, requires_grad=False)
    {"input": h, "weight": w, "bias": b}[where].view(-1)[0] = bad
    for t in (h, w, b):
        t.requires_grad_()
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend=backend, seed=0, reduction="sum")
    out.loss.backward()
    # -inf in the bias only removes that class from the softmax (a legitimate vocabulary mask) unless it
    # is a target; every other non-finite value must make the loss non-finite, never a finite number.
    if where == "bias" and bad == -math.inf and not bool((y == 0).any()):
        assert torch.isfinite(out.loss) and all(torch.isfinite(t.grad).all() for t in (h, w))
    else:
        assert not torch.isfinite(out.loss)


def test_non_finite_in_ignored_row_stays_out():
    h, w, b, y = small()
    h[1] = math.nan
    y[1] = -100
    h.requires_grad_()
    out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, backend="torch", seed=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.all(h.grad[1] == 0)


# ---- signs -----------------------------------------------------------------------------------------
def test_philox_known_answers():
    # Random123's published Philox4x32-10 known-answer vectors.
    def run(counter, key):
        return [int(x) for x in philox4x32(tuple(torch.tensor([c]) for c in counter), key)]
    assert run((0, 0, 0, 0), 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run((0xFFFFFFFF,) * 4, 2**64 - 1) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_sign_stream_layout():
    seed = 987654321
    signs = philox_signs(seed, 3, 100)  # 300 signs: counters 0, 1, 2 (the last one partly used)
    flat = signs.reshape(-1)
    for i in (0, 31, 32, 127, 128, 200, 299):
        words = philox4x32((torch.tensor([i // 128]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])), seed)
        bit = (int(words[(i // 32) % 4]) >> (i % 32)) & 1
        assert flat[i] == (-1.0 if bit else 1.0)
    big = philox_signs(1, 500, 200)
    assert set(big.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(big.mean())) < 4 / math.sqrt(big.numel())  # balanced to 4 standard errors


def test_seed_reproducibility_and_manual_seed():
    h, w, b, y = small()
    a = dropreg.linear_cross_entropy(h, w, y, seed=5).implicit
    assert torch.equal(a, dropreg.linear_cross_entropy(h, w, y, seed=5).implicit)
    assert not torch.equal(a, dropreg.linear_cross_entropy(h, w, y, seed=6).implicit)
    torch.manual_seed(3)
    first = dropreg.linear_cross_entropy(h, w, y).implicit
    torch.manual_seed(3)
    assert torch.equal(first, dropreg.linear_cross_entropy(h, w, y).implicit)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_seeded_signs_equal_explicit_philox_signs(backend):
    h, w, b, y = small(lead=(3, 5), d=9)
    seeded = dropreg.linear_cross_entropy(h, w, y, seed=2024, backend=backend, reduction="none")
    signs = philox_signs(2024, 15, 9, dtype=h.dtype).reshape(3, 5, 9)
    given = dropreg.linear_cross_entropy(h, w, y, signs=signs, backend=backend, reduction="none")
    torch.testing.assert_close(seeded.implicit, given.implicit, rtol=0, atol=0)


def test_broadcast_signs():
    h, w, b, y = small(lead=(2, 3))
    per_unit = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    a = dropreg.linear_cross_entropy(h, w, y, signs=per_unit, reduction="none")
    b2 = dropreg.linear_cross_entropy(h, w, y, signs=per_unit.expand(2, 3, 3).clone(), reduction="none")
    torch.testing.assert_close(a.implicit, b2.implicit)


# ---- gradcheck in float64 --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck(backend, reduction):
    h, w, b, y = small(lead=(5,), d=3, vocab=8, requires_grad=True)
    y[2] = -100
    signs = torch.randint(0, 2, (5, 3)).double() * 2 - 1

    def fn(h, w, b):
        out = dropreg.linear_cross_entropy(h, w, y, linear_bias=b, p=0.3, signs=signs, reduction=reduction,
                                           backend=backend)
        return out.ce, out.explicit, out.implicit

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_chosen_backend_names_what_auto_runs():
    from dropreg import cpu
    expected_cpu = "cpu" if cpu.is_available() else "torch"
    assert dropreg.chosen_backend() == dropreg.chosen_backend("cpu") == expected_cpu
    assert dropreg.chosen_backend(torch.device("cuda")) == "chunked"  # a device need not be present to ask
    assert dropreg.chosen_backend("cuda", op="rdrop_linear_cross_entropy") == "chunked"
    assert dropreg.chosen_backend("cpu", sliced=True) == "torch"
    assert dropreg.chosen_backend("meta") == "torch"
    with pytest.raises(ValueError, match="^op: expected one of"):
        dropreg.chosen_backend(op="linear_ce")
    # what it names is what backend="auto" runs: the same bits
    h, w, y = torch.randn(6, 5), torch.randn(9, 5), torch.randint(0, 9, (6,))
    auto = dropreg.linear_cross_entropy(h, w, y, seed=3)
    named = dropreg.linear_cross_entropy(h, w, y, seed=3, backend=dropreg.chosen_backend(h.device))
    assert all(torch.equal(a, b) for a, b in zip(auto, named))


def test_help_tells_a_user_where_to_start():
    doc = dropreg.__doc__
    for needle in ("dropreg.hf", "dropreg.diagnostics", "kappa = p / (1 - p)", "chosen_backend"):
        assert needle in doc, needle
    lce = dropreg.linear_cross_entropy.__doc__
    for needle in ("``p`` is the dropout rate", "``reduction``", "``backend``", "chosen_backend"):
        assert needle in lce, needle
    assert "LinearCrossEntropyOutput" in str(dropreg.linear_cross_entropy.__annotations__["return"])
