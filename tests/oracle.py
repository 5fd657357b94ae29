"""The float64 oracle: dropout's terms from first principles with autograd, never from docs/math.md's closed forms.

For row n with loss ``l(h) = cross_entropy(W h + b, y)``:

* the explicit quadratic form is ``sum_j h_j^2 * d^2 l / d h_j^2``, the diagonal of the Hessian that
  ``torch.autograd.functional.hessian`` builds (``diag(W^T H_softmax W) = var``);
* the implicit sign term is ``sum_j sigma_j h_j * d l / d h_j``, the gradient taken by autograd.

Both are built with ``create_graph=True``, so gradients of the oracle w.r.t. input, weight and bias come
from double backprop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def oracle_rows(h, weight, bias, target, signs, ignore_index=-100, class_weight=None, label_smoothing=0.0,
                z_loss=0.0, softcap=None):
    """Per-row float64 ``(ce, quadratic, sign_term, z_term)``; ignored rows are 0.

    ``class_weight`` and ``label_smoothing`` are F.cross_entropy's ``weight`` and ``label_smoothing``: the row loss
    is F.cross_entropy's with reduction "sum" over the one row (``w_y``-weighted, not divided by it).
    ``z_loss`` adds ``z_loss * logsumexp(z)^2`` to the row loss (reported apart as ``z_term``, but part of the loss
    whose Hessian and gradient make the other two terms). ``softcap`` replaces the logits ``z`` by
    ``softcap * tanh(z / softcap)`` before everything else.

    ``h`` must require grad (the terms are derivatives w.r.t. it); the result is differentiable in h,
    weight and bias.
    """
    ce_rows, quad_rows, sign_rows, z_rows = [], [], [], []
    zero = h.new_zeros(())
    for n in range(h.shape[0]):
        y = int(target[n])
        if y == ignore_index:
            for rows in (ce_rows, quad_rows, sign_rows, z_rows):
                rows.append(zero)
            continue

        def row_logits(h_row):
            logits = weight @ h_row
            if bias is not None:
                logits = logits + bias
            return logits if softcap is None else softcap * torch.tanh(logits / softcap)

        def row_ce(h_row, y=y):
            return F.cross_entropy(row_logits(h_row)[None], torch.tensor([y]), weight=class_weight,
                                   label_smoothing=label_smoothing, reduction="sum")

        def row_z(h_row):
            return z_loss * torch.logsumexp(row_logits(h_row), 0) ** 2

        def row_loss(h_row):
            return row_ce(h_row) + row_z(h_row)

        h_row = h[n]
        loss = row_loss(h_row)
        (grad_h,) = torch.autograd.grad(loss, h_row, create_graph=True)
        hessian = torch.autograd.functional.hessian(row_loss, h_row, create_graph=True)
        ce_rows.append(row_ce(h_row))
        quad_rows.append((h_row * h_row * hessian.diagonal()).sum())
        sign_rows.append((signs[n] * h_row * grad_h).sum())
        z_rows.append(row_z(h_row))
    return torch.stack(ce_rows), torch.stack(quad_rows), torch.stack(sign_rows), torch.stack(z_rows)
