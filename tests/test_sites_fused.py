"""The paper's method in one call, ``linear_cross_entropy(..., sites=...)``: against its building blocks
(``linear_cross_entropy`` + ``site_regularizers`` with the same seed) and its argument checks. Against the authors'
formulation on materialized float64 logits: tests/test_sites.py::test_matches_the_authors_formulation."""
import pytest
import torch

import dropreg
from test_sites import TinyLSTM, TinyMLP


def _fused_step(model, ids, target, backend, **kwargs):
    """The fused call's terms and every parameter's gradient of ce + explicit + 2 implicit."""
    model.zero_grad()
    hidden = model(ids)
    sites, ps = dropreg.DropoutSite.collect(model)
    out = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, sites=sites,
                                       site_p=ps, backend=backend, **kwargs)
    (out.ce + out.explicit + 2 * out.implicit).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_equals_its_building_blocks_with_the_same_seed(backend):
    """Draws and signs from ``seed``: the same values and gradients as cross entropy + site_regularizers, the head
    input's own exact terms (p > 0) added on top. The head input (TinyLSTM's second site) is then not a site."""
    vocab, dim = 19, 6
    model = TinyLSTM(vocab, dim).double()
    ids = torch.randint(0, vocab, (3, 5))
    target = torch.randint(0, vocab, (3, 5))
    target[2, 0] = -100

    def step(fused):
        model.zero_grad()
        hidden = model(ids)
        sites, ps = dropreg.DropoutSite.collect(model)
        sites, ps = sites[:1], ps[:1]
        head_kwargs = dict(linear_bias=model.head.bias, p=0.2, seed=11, backend=backend)
        if fused:
            out = dropreg.linear_cross_entropy(hidden, model.head.weight, target, sites=sites, site_p=ps, samples=2,
                                               **head_kwargs)
            terms = (out.ce, out.explicit, out.implicit)
        else:
            head = dropreg.linear_cross_entropy(hidden, model.head.weight, target, **head_kwargs)
            reg = dropreg.site_regularizers(hidden, model.head.weight, target, sites, linear_bias=model.head.bias,
                                            p=ps, seed=11, samples=2, backend=backend)
            assert abs(head.explicit.item()) > 1e-6 and abs(reg.explicit.item()) > 1e-6
            terms = (head.ce, head.explicit + reg.explicit, head.implicit + reg.implicit)
        (terms[0] + terms[1] + 2 * terms[2]).backward()
        return terms, {name: p.grad.clone() for name, p in model.named_parameters()}

    (fused_terms, fused_grads), (terms, grads) = step(True), step(False)
    for ours, theirs in zip(fused_terms, terms):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_switches_turn_a_kind_of_term_off_everywhere(streamed_backend):
    vocab, dim = 11, 4
    model = TinyMLP(vocab, dim).double()
    ids, target = torch.randint(0, vocab, (7,)), torch.randint(0, vocab, (7,))
    both, _ = _fused_step(model, ids, target, streamed_backend, p=0.0, seed=3)
    no_explicit, _ = _fused_step(model, ids, target, streamed_backend, p=0.0, seed=3, explicit=False)
    no_implicit, _ = _fused_step(model, ids, target, streamed_backend, p=0.0, seed=3, implicit=False)
    assert both.explicit != 0 and both.implicit != 0
    assert no_explicit.explicit == 0 and no_implicit.implicit == 0
    torch.testing.assert_close(no_explicit.implicit, both.implicit, rtol=1e-12, atol=0)
    torch.testing.assert_close(no_implicit.explicit, both.explicit, rtol=1e-12, atol=0)


def test_the_head_input_is_a_site_only_without_its_exact_terms(streamed_backend):
    vocab, dim = 9, 4
    model = TinyMLP(vocab, dim).double()
    ids, target = torch.randint(0, vocab, (6,)), torch.randint(0, vocab, (6,))
    hidden = model(ids)
    sites, _ = dropreg.DropoutSite.collect(model)
    with pytest.raises(ValueError, match="sites: input itself is a site while the head input's own exact terms"):
        dropreg.linear_cross_entropy(hidden, model.head.weight, target, sites=sites + [hidden], seed=1,
                                     backend=streamed_backend)
    fused = dropreg.linear_cross_entropy(hidden, model.head.weight, target, p=0.0, sites=sites + [hidden],
                                         site_p=[0.1, 0.2, 0.3], seed=1, backend=streamed_backend)
    reg = dropreg.site_regularizers(hidden, model.head.weight, target, sites + [hidden], p=[0.1, 0.2, 0.3], seed=1,
                                    backend=streamed_backend)
    torch.testing.assert_close(fused.explicit, reg.explicit, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused.implicit, reg.implicit, rtol=1e-12, atol=1e-14)


def test_no_sites_adds_nothing(streamed_backend):
    """An empty list (DropoutSite.collect in eval mode) gives the call without sites; so do all-zero coefficients."""
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 8, (5,))
    plain = dropreg.linear_cross_entropy(h, w, y, seed=4, backend=streamed_backend)
    for kwargs in (dict(sites=[]), dict(sites=[h * 2.0], site_explicit_coef=0.0, site_implicit_coef=0.0)):
        out = dropreg.linear_cross_entropy(h, w, y, seed=4, backend=streamed_backend, **kwargs)
        for ours, theirs in zip(out, plain):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_all_ignored_rows_give_zero_site_terms(streamed_backend):
    vocab, dim = 7, 3
    model = TinyMLP(vocab, dim).double()
    ids = torch.randint(0, vocab, (4,))
    out, grads = _fused_step(model, ids, torch.full((4,), -100), streamed_backend, p=0.0, seed=2)
    assert out.ce == 0 and out.explicit == 0 and out.implicit == 0
    assert all(torch.all(g == 0) for g in grads.values())


def _problem():
    h0 = torch.randn(4, 3, requires_grad=True)
    site = h0 * 1.0
    return torch.tanh(site), site, torch.randn(6, 3, requires_grad=True), torch.randint(0, 6, (4,))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(reduction="none"), ValueError, "reduction: expected 'mean' or 'sum' with sites="),
    (dict(weight=torch.ones(6)), ValueError, "weight: not defined with sites="),
    (dict(label_smoothing=0.1), ValueError, "label_smoothing: not defined with sites="),
    (dict(z_loss=1e-3), ValueError, "z_loss: not defined with sites="),
    (dict(softcap=5.0), ValueError, "softcap: not defined with sites="),
    (dict(site_p=[0.1, 0.2]), ValueError, r"site_p: expected one value per site \(1\)"),
    (dict(site_p=1.0), ValueError, "site_p"),
    (dict(site_explicit_coef=-1.0), ValueError, "site_explicit_coef"),
    (dict(samples=0), ValueError, "samples: expected a positive int"),
    (dict(sampled_targets=torch.zeros(2, 5, dtype=torch.long)), ValueError, "sampled_targets: expected shape"),
    (dict(sampled_targets=torch.full((1, 4), 6)), ValueError, r"sampled_targets: expected class indices in \[0, 6\)"),
    (dict(site_signs=[torch.ones(4, 3), torch.ones(4, 3)]), TypeError, "site_signs: expected a sequence of 1"),
    (dict(site_signs=[torch.full((4, 3), 2.0)]), ValueError, r"site_signs\[0\]: expected every value to be"),
    (dict(sites="x"), TypeError, "sites: expected a sequence of tensors"),
    (dict(sites=[torch.ones(4, 3)]), ValueError, r"sites\[0\]: expected a tensor in input's autograd graph"),
])
def test_bad_site_arguments_name_the_argument(kwargs, error, message):
    hidden, site, w, y = _problem()
    kwargs = dict(dict(sites=[site], p=0.0, seed=0), **kwargs)
    with pytest.raises(error, match=message):
        dropreg.linear_cross_entropy(hidden, w, y, backend="torch", **kwargs)


@pytest.mark.parametrize("argument", ["site_p", "site_explicit_coef", "site_implicit_coef", "samples",
                                      "sampled_targets", "site_signs"])
def test_a_site_argument_without_sites_is_refused(argument):
    hidden, _, w, y = _problem()
    value = {"samples": 2, "sampled_targets": torch.zeros(1, 4, dtype=torch.long),
             "site_signs": [torch.ones(4, 3)]}.get(argument, 0.2)
    with pytest.raises(TypeError, match=f"{argument}: only used with sites="):
        dropreg.linear_cross_entropy(hidden, w, y, **{argument: value})


def test_a_site_outside_the_graph_of_input_is_named():
    hidden, _, w, y = _problem()
    elsewhere = torch.randn(4, 3, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match=r"sites\[0\]: not in input's autograd graph"):
        dropreg.linear_cross_entropy(hidden, w, y, p=0.0, sites=[elsewhere], seed=0, backend="torch")


def test_input_must_require_grad_with_sites():
    _, site, w, y = _problem()
    with pytest.raises(ValueError, match="input: expected a tensor that requires grad with sites="):
        dropreg.linear_cross_entropy(torch.randn(4, 3), w, y, p=0.0, sites=[site], seed=0)
