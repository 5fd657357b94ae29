"""The nn.Module wrapper in training code."""
import pytest
import torch
from torch import nn

import dropreg
from checks import assert_ignore_index_acts_as_minus_100


class TinyLM(nn.Module):
    def __init__(self, vocab=31, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def test_module_matches_functional_and_trains():
    model = TinyLM()
    loss_fn = dropreg.LinearCrossEntropyLoss(p=0.2)
    ids = torch.randint(0, 31, (4, 10))
    hidden = model(ids)
    out = loss_fn(hidden, model.lm_head.weight, ids, seed=3)
    ref = dropreg.linear_cross_entropy(hidden, model.lm_head.weight, ids, p=0.2, seed=3)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    # Training from a fixed draw: loss going down in 30 steps is typical, not certain for every initialization
    # and sign stream, so this part is deterministic rather than carrying a false-failure rate.
    torch.manual_seed(0)
    model, ids = TinyLM(), torch.randint(0, 31, (4, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(model(ids), model.lm_head.weight, ids).loss
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


def test_eval_mode_turns_regularizers_off_like_dropout():
    # the one train/eval rule: the flag switches the explicit and implicit terms only
    loss_fn = dropreg.LinearCrossEntropyLoss(p=0.3, z_loss=1e-2, label_smoothing=0.1)
    h, w, y = torch.randn(6, 5), torch.randn(9, 5), torch.randint(0, 9, (6,))
    train = loss_fn(h, w, y, seed=1)
    assert train.explicit > 0
    loss_fn.eval()
    evaluated = loss_fn(h, w, y, seed=1)
    assert evaluated.explicit == 0 and evaluated.implicit == 0
    torch.testing.assert_close(evaluated.ce, train.ce)  # label smoothing in both modes
    torch.testing.assert_close(evaluated.z_loss, train.z_loss)
    assert evaluated.z_loss > 0
    smoothed = dropreg.linear_cross_entropy(h, w, y, explicit=False, implicit=False, label_smoothing=0.1).ce
    torch.testing.assert_close(evaluated.ce, smoothed)
    loss_fn.regularize_in_eval = True
    torch.testing.assert_close(loss_fn(h, w, y, seed=1).explicit, train.explicit)


def test_shift_labels_follows_the_causal_lm_convention():
    loss_fn = dropreg.LinearCrossEntropyLoss(p=0.1, shift_labels=True, reduction="none")
    h, w = torch.randn(2, 5, 4), torch.randn(7, 4)
    ids = torch.randint(0, 7, (2, 5))
    out = loss_fn(h, w, ids, seed=0)
    expected = dropreg.linear_cross_entropy(h[:, :-1], w, ids[:, 1:], p=0.1, reduction="none",
                                            signs=dropreg.philox_signs(0, 10, 4).reshape(2, 5, 4)[:, :-1])
    torch.testing.assert_close(out.ce[:, :-1], expected.ce)
    torch.testing.assert_close(out.explicit[:, :-1], expected.explicit)
    torch.testing.assert_close(out.implicit[:, :-1], expected.implicit)
    assert torch.all(out.ce[:, -1] == 0)
    assert "shift_labels=True" in repr(loss_fn)


def test_modules_pass_their_loss_options_on():
    """Class weights, label smoothing, z-loss and softcap given to a module reach the functional call."""
    vocab, dim = 23, 6
    hidden, hidden2 = torch.randn(2, 5, dim, dtype=torch.float64), torch.randn(2, 5, dim, dtype=torch.float64)
    head = torch.randn(vocab, dim, dtype=torch.float64)
    target = torch.randint(0, vocab, (2, 5))
    class_weight = torch.rand(vocab, dtype=torch.float64) + 0.5
    for options in (dict(weight=class_weight, label_smoothing=0.1, z_loss=0.01), dict(z_loss=0.02, softcap=1.5),
                    dict(weight=class_weight, label_smoothing=0.2, softcap=1.5)):
        module = dropreg.LinearCrossEntropyLoss(p=0.2, **options)
        ref = dropreg.linear_cross_entropy(hidden, head, target, p=0.2, seed=4, **options)
        for a, b in zip(module(hidden, head, target, seed=4), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        module = dropreg.RDropLoss(alpha=0.5, **options)
        ref = dropreg.rdrop_linear_cross_entropy(hidden, hidden2, head, target, alpha=0.5, **options)
        for a, b in zip(module(hidden, hidden2, head, target), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = dropreg.RDropLoss(alpha=0.5)(hidden, hidden2, head, target)
    assert not torch.equal(plain.ce1, ref.ce1)  # the options changed the result


@pytest.mark.parametrize("ignore_index", [2, -1])
def test_loss_module_custom_ignore_index_acts_as_minus_100(ignore_index):
    """The module passes its ignore_index on, also to shift_labels' padding."""
    h = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5))
    labels[0, 1] = labels[1, 3] = ignore_index
    for shift in (False, True):
        def run(target, index, shift=shift):
            loss_fn = dropreg.LinearCrossEntropyLoss(p=0.2, ignore_index=index, shift_labels=shift)
            out = loss_fn(h, w, target, seed=4)
            return out.ce.reshape(1), out.explicit.reshape(1), out.implicit.reshape(1)
        assert_ignore_index_acts_as_minus_100(run, labels, ignore_index, [h, w])
