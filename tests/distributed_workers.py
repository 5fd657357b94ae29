"""What each rank runs in tests/test_distributed.py (a module of its own so spawned ranks import only this).

Every rank builds the same full problem from a fixed seed, runs dropreg on one process (backend "torch") and on
its slice of the head with ``process_group``, and reports errors and tolerances; the parent process asserts.
With DROPREG_TEST_DEVICE=cuda (inherited from the parent) every rank's tensors live on GPU 0: the problems are
drawn on the CPU with the same generators and moved there, so the figures are the CPU runs' up to rounding.
"""
from __future__ import annotations

import copy
import datetime
import functools
import math
import os
import pickle
import sys
import traceback

import torch
import torch.distributed as dist

import dropreg
import dropreg.distributed

EPS32 = 2.0**-23


def entry(rank, world, init_file, result_dir, case, args, process_group_backend="gloo"):
    """Spawned rank: join the group (gloo, or NCCL on CUDA), run ``case``, write its result (or its exception) to a
    file."""
    torch.set_num_threads(1)
    try:
        if os.environ.get("DROPREG_TEST_DEVICE") == "cuda":
            torch.cuda.set_device(0)  # one GPU lent: every rank shares it (NCCL only with world size 1)
            torch.set_default_device("cuda")
        dist.init_process_group(process_group_backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        outcome = ("ok", globals()[case](rank, world, *args))
    except BaseException as error:  # reported to the parent, which fails the test
        outcome = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(outcome, f)
    sys.stdout.flush()
    os._exit(0)  # skip teardown: a rank left waiting on a timed-out collective must not block the exit


# ------------------------------------------------------------------------------------------------ problems


def vocab_slices(sizes):
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(o, o + s) for o, s in zip(offsets, sizes)]


def _on_cpu_then_moved(draw):
    """``draw()`` run with CPU tensors (its generators are CPU ones), its tensors then moved to the ranks' default
    device: the same values on every device."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        drawn = draw()
    if isinstance(drawn, dict):
        return {name: value.to(device) for name, value in drawn.items()}
    return tuple(value.to(device) for value in drawn) if isinstance(drawn, tuple) else drawn.to(device)


def make_problem(sizes, rows=(2, 3), dim=5, seed=1234):
    """float64 master tensors; targets avoid rank 1's slice (a shard that holds no target) and two rows are
    ignored."""
    return _on_cpu_then_moved(lambda: _draw_problem(sizes, rows, dim, seed))


def _draw_problem(sizes, rows, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = sum(sizes)
    h = torch.randn(*rows, dim, generator=gen, dtype=torch.float64)
    h2 = h + 0.3 * torch.randn(*rows, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 1.5 / dim**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    allowed = torch.arange(vocab)
    if len(sizes) > 1:
        skip = vocab_slices(sizes)[1]
        allowed = allowed[(allowed < skip.start) | (allowed >= skip.stop)]
    target = allowed[torch.randint(0, len(allowed), rows, generator=gen)]
    target.view(-1)[[1, 4]] = -100
    cot = torch.randn(4, *rows, generator=gen, dtype=torch.float64)
    cot_mu = torch.randn(*rows, dim, generator=gen, dtype=torch.float64)
    return dict(h=h, h2=h2, w=w, b=b, target=target, cot=cot, cot_mu=cot_mu)


def _tolerance(dtype, reference, problem, extra=0.0):
    """float64: 1e-12 relative to the quantity's size. float32: twice the suite's oracle criterion
    (tests/checks.py: 8 eps (1 + max|z|) (max|ref| + extra + 1)), since both runs are each that close to it."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if dtype == torch.float64:
        return 1e-12 * (1.0 + scale)
    z = problem["h"].reshape(-1, problem["h"].shape[-1]) @ problem["w"].T + problem["b"]
    return 16 * EPS32 * (1.0 + float(z.abs().max())) * (scale + extra + 1.0)


def _explicit_extra(problem, coef):
    """docs/math.md 8.2's cancellation scale: coef * max_n (q . m2)_n * max(1, max|W|)."""
    h = problem["h"].reshape(-1, problem["h"].shape[-1])
    w = problem["w"]
    s = torch.softmax(h @ w.T + problem["b"], dim=-1)
    return coef * float(((h * h) * (s @ (w * w))).sum(1).max()) * max(1.0, float(w.abs().max()))


class Report:
    def __init__(self, problem):
        self.problem = problem
        self.errors = {}  # label -> (error, tolerance)
        self.outputs = {}  # label -> float64 tensor, checked identical across ranks

    def compare(self, label, ours, reference, dtype, extra=0.0):
        ours, reference = ours.detach().double(), reference.detach().double()
        err = float((ours - reference).abs().max()) if reference.numel() else 0.0
        self.errors[label] = (err, _tolerance(dtype, reference, self.problem, extra))

    def output(self, label, value):
        self.outputs[label] = value.detach().double().cpu().clone()


def _leaves(problem, dtype, sl=None, bias=True):
    w = problem["w"] if sl is None else problem["w"][sl]
    b = problem["b"] if sl is None else problem["b"][sl]
    return (problem["h"].to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_(),
            b.to(dtype).clone().requires_grad_() if bias else None)


def _grads(outputs, cotangents, leaves):
    total = sum((o * c.to(o.dtype)).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(total, [t for t in leaves if t is not None])


# ------------------------------------------------------------------------------------------------ cases


def local_backends():
    """The backends that can do a slice's work here: the C++ kernels only where they are already built (four ranks
    must not each start a JIT build)."""
    import importlib.util
    from dropreg import cpu
    built = importlib.util.find_spec("dropreg._C") is not None
    on_cpu = torch.get_default_device().type == "cpu"
    return ("torch", "chunked", "cpu") if on_cpu and built and cpu.FAMILY.is_available() else ("torch", "chunked")


def compare_worlds(rank, world, sizes_by_world):
    """:func:`compare_all` on the subgroups of the first 1, 2, ... ranks, so that one spawn covers every size."""
    results = {"local_backends": local_backends()}
    for size in sorted(sizes_by_world):
        group = dist.new_group(list(range(size)))  # every rank takes part in creating each group
        # Odd sizes use 3-row blocks and 5-class chunks (as tests/conftest.py's "torch-small-tiles" and "chunked"),
        # so the merge inside a slice and chunk tails are exercised too; the one-process runs use the same tiles.
        plan = dropreg.BlockPlan(row_block=3, vocab_chunk=5) if size % 2 == 1 else None
        if rank < size:
            results[size] = compare_all(rank, size, sizes_by_world[size], group, plan)
        dist.barrier()
    return results


def _with_plan(plan, name):
    """``backend=`` for the registered backend ``name`` with ``plan`` (None: its own)."""
    return name if plan is None or name == "reference" else dropreg.get_backend(name).with_plan(plan)


def compare_all(rank, world, sizes, group, plan=None):
    """Every op, reduction, dtype and bias setting: the sliced head against one process (both with ``plan``'s
    blocks, when given)."""
    tiles = functools.partial(_with_plan, plan)
    problem = make_problem(sizes)
    sl = vocab_slices(sizes)[rank]
    report = Report(problem)
    p = 0.3
    coef_r, _ = dropreg.default_coefficients(p)
    target = problem["target"]
    for dtype, local in [(d, b) for b in local_backends() for d in (torch.float64, torch.float32)]:
        tag = str(dtype).split(".")[-1] + ("" if local == "torch" else f"/{local}")
        for bias in (True, False):
            for reduction in ("none", "sum", "mean"):
                label = f"lce/{tag}/bias={bias}/{reduction}"
                full, part = _leaves(problem, dtype, bias=bias), _leaves(problem, dtype, sl, bias=bias)
                kwargs = dict(p=p, seed=7, reduction=reduction)
                ref = dropreg.linear_cross_entropy(full[0], full[1], target, linear_bias=full[2], backend=tiles("torch"),
                                                   **kwargs)
                out = dropreg.linear_cross_entropy(part[0], part[1], target, linear_bias=part[2],
                                                   process_group=group, backend=tiles(local), **kwargs)
                cots = problem["cot"][:3] if reduction == "none" else torch.ones(3, dtype=torch.float64)
                for name, o, r in zip(("ce", "explicit", "implicit"), out, ref):
                    extra = _explicit_extra(problem, coef_r) if name == "explicit" else 0.0
                    report.compare(f"{label}/{name}", o, r, dtype, extra)
                    report.output(f"{label}/{name}", o)
                g_ref = _grads(ref, cots, full)
                g_out = _grads(out, cots, part)
                extra = _explicit_extra(problem, coef_r)
                report.compare(f"{label}/grad_input", g_out[0], g_ref[0], dtype, extra)
                report.compare(f"{label}/grad_weight", g_out[1], g_ref[1][sl], dtype, extra)
                if bias:
                    report.compare(f"{label}/grad_bias", g_out[2], g_ref[2][sl], dtype, extra)
                report.output(f"{label}/grad_input", g_out[0])

        _options_cases(report, problem, sl, group, dtype, local, tag, p, coef_r, tiles)

        # explicit_regularizer, no bias, "mean"
        full, part = _leaves(problem, dtype, bias=False), _leaves(problem, dtype, sl, bias=False)
        ref = dropreg.explicit_regularizer(full[0], full[1], backend=tiles("torch"))
        out = dropreg.explicit_regularizer(part[0], part[1], process_group=group, backend=tiles(local))
        extra = _explicit_extra(problem, 1.0)
        report.compare(f"explicit_regularizer/{tag}", out, ref, dtype, extra)
        g_ref, g_out = _grads([ref], [torch.ones(())], full), _grads([out], [torch.ones(())], part)
        report.compare(f"explicit_regularizer/{tag}/grad_input", g_out[0], g_ref[0], dtype, extra)
        report.compare(f"explicit_regularizer/{tag}/grad_weight", g_out[1], g_ref[1][sl], dtype, extra)

        # R-Drop
        for bias in (True, False):
            for reduction in ("none", "mean"):
                label = f"rdrop/{tag}/bias={bias}/{reduction}"
                full, part = _leaves(problem, dtype, bias=bias), _leaves(problem, dtype, sl, bias=bias)
                second_full = problem["h2"].to(dtype).clone().requires_grad_()
                second_part = problem["h2"].to(dtype).clone().requires_grad_()
                ref = dropreg.rdrop_linear_cross_entropy(full[0], second_full, full[1], target, linear_bias=full[2],
                                                         alpha=0.7, reduction=reduction, backend=tiles("torch"))
                out = dropreg.rdrop_linear_cross_entropy(part[0], second_part, part[1], target, linear_bias=part[2],
                                                         alpha=0.7, reduction=reduction, process_group=group,
                                                         backend=tiles(local))
                for name, o, r in zip(("ce1", "ce2", "kl", "loss"), out, ref):
                    report.compare(f"{label}/{name}", o, r, dtype)
                    report.output(f"{label}/{name}", o)
                cots = problem["cot"][:3] if reduction == "none" else torch.ones(3, dtype=torch.float64)
                g_ref = _grads(ref[:3], cots, (full[0], second_full, full[1], full[2]))
                g_out = _grads(out[:3], cots, (part[0], second_part, part[1], part[2]))
                report.compare(f"{label}/grad_input1", g_out[0], g_ref[0], dtype)
                report.compare(f"{label}/grad_input2", g_out[1], g_ref[1], dtype)
                report.compare(f"{label}/grad_weight", g_out[2], g_ref[2][sl], dtype)
                if bias:
                    report.compare(f"{label}/grad_bias", g_out[3], g_ref[3][sl], dtype)

        # softmax_mean
        full, part = _leaves(problem, dtype), _leaves(problem, dtype, sl)
        ref = dropreg.softmax_mean(full[0], full[1], linear_bias=full[2], backend=tiles("torch"))
        out = dropreg.softmax_mean(part[0], part[1], linear_bias=part[2], process_group=group, backend=tiles(local))
        report.compare(f"softmax_mean/{tag}", out, ref, dtype)
        report.output(f"softmax_mean/{tag}", out)
        g_ref, g_out = _grads([ref], [problem["cot_mu"]], full), _grads([out], [problem["cot_mu"]], part)
        report.compare(f"softmax_mean/{tag}/grad_input", g_out[0], g_ref[0], dtype)
        report.compare(f"softmax_mean/{tag}/grad_weight", g_out[1], g_ref[1][sl], dtype)
        report.compare(f"softmax_mean/{tag}/grad_bias", g_out[2], g_ref[2][sl], dtype)

    # sample_targets: identical draws (float64 scores, so ties between classes do not occur)
    full, part = _leaves(problem, torch.float64), _leaves(problem, torch.float64, sl)
    ref = dropreg.sample_targets(full[0], full[1], linear_bias=full[2], samples=3, seed=11, backend=tiles("torch"))
    out = dropreg.sample_targets(part[0], part[1], linear_bias=part[2], samples=3, seed=11, process_group=group)
    report.errors["sample_targets/float64"] = (float((out != ref).sum()), 0.0)
    report.output("sample_targets", out)

    # The nn modules pass process_group through.
    full, part = _leaves(problem, torch.float64), _leaves(problem, torch.float64, sl)
    ref = dropreg.LinearCrossEntropyLoss(p=0.3, shift_labels=True, backend=tiles("torch"))(full[0], full[1], target,
                                                                                    full[2], seed=4)
    out = dropreg.LinearCrossEntropyLoss(p=0.3, shift_labels=True, process_group=group)(part[0], part[1], target,
                                                                                        part[2], seed=4)
    report.compare("LinearCrossEntropyLoss/loss", out.loss, ref.loss, torch.float64)
    ref = dropreg.RDropLoss(alpha=0.5, backend=tiles("torch"))(full[0], problem["h2"], full[1], target, full[2])
    out = dropreg.RDropLoss(alpha=0.5, process_group=group)(part[0], problem["h2"], part[1], target, part[2])
    report.compare("RDropLoss/loss", out.loss, ref.loss, torch.float64)

    report.errors.update(_site_regularizers_case(rank, sizes, group, problem))
    return report.errors, report.outputs


# Loss options on a sliced head: class weights (each rank passes its slice's), label smoothing, z-loss, return_lse.
OPTION_CASES = {
    "weight+smoothing": dict(bias=True, reduction="mean", weight=True, label_smoothing=0.2),
    "z_loss+lse": dict(bias=False, reduction="none", z_loss=0.05, return_lse=True),
    "all/ce-only": dict(bias=True, reduction="sum", weight=True, label_smoothing=0.1, z_loss=0.03, explicit=False,
                        implicit=False),
    # softcap 1.5 bends the problem's logits (|z| up to about 3)
    "softcap": dict(bias=True, reduction="mean", softcap=1.5),
    "softcap+weight+z_loss+lse": dict(bias=False, reduction="none", weight=True, z_loss=0.05, return_lse=True,
                                      softcap=1.5),
    "softcap/implicit": dict(bias=True, reduction="sum", softcap=2.5, explicit=False),
    "softcap/ce-only": dict(bias=True, reduction="mean", softcap=1.5, z_loss=0.02, explicit=False, implicit=False),
    # label smoothing on a capped head: the slices' streamed sums S, q . K2, u . K1 are added (docs/math.md 3.7)
    "softcap+weight+smoothing": dict(bias=True, reduction="none", weight=True, label_smoothing=0.2, softcap=1.5),
    "softcap+smoothing+z_loss/ce-only": dict(bias=False, reduction="sum", label_smoothing=0.1, z_loss=0.02,
                                             softcap=2.5, explicit=False, implicit=False),
}


def _class_weights(problem):
    gen = torch.Generator().manual_seed(77)
    return _on_cpu_then_moved(lambda: 0.5 + torch.rand(problem["w"].shape[0], generator=gen, dtype=torch.float64))


def _options_cases(report, problem, sl, group, dtype, local, tag, p, coef_r, tiles):
    target = problem["target"]
    class_weight = _class_weights(problem).to(dtype)
    for case, spec in OPTION_CASES.items():
        spec = dict(spec)
        bias, reduction = spec.pop("bias"), spec.pop("reduction")
        with_weight = spec.pop("weight", False)
        label = f"options/{tag}/{case}"
        full, part = _leaves(problem, dtype, bias=bias), _leaves(problem, dtype, sl, bias=bias)
        kwargs = dict(p=p, seed=5, reduction=reduction, **spec)
        ref = dropreg.linear_cross_entropy(full[0], full[1], target, linear_bias=full[2], backend=tiles("torch"),
                                           weight=class_weight if with_weight else None, **kwargs)
        out = dropreg.linear_cross_entropy(part[0], part[1], target, linear_bias=part[2], process_group=group,
                                           backend=tiles(local), weight=class_weight[sl] if with_weight else None, **kwargs)
        names = ["ce", "explicit", "implicit", "z_loss"]
        if spec.get("return_lse"):  # (output, lse)
            (ref, ref_lse), (out, out_lse) = ref, out
            names.append("lse")
        ref_values, out_values = list(ref), list(out)
        if spec.get("return_lse"):
            ref_values.append(ref_lse)
            out_values.append(out_lse)
        extra = _explicit_extra(problem, coef_r)
        for name, o, r in zip(names, out_values, ref_values):
            report.compare(f"{label}/{name}", o, r, dtype, extra if name == "explicit" else 0.0)
            report.output(f"{label}/{name}", o)
        cots = [problem["cot"][i % 4] if reduction == "none" else torch.ones((), dtype=torch.float64)
                for i in range(len(names))]
        g_ref, g_out = _grads(ref_values, cots, full), _grads(out_values, cots, part)
        report.compare(f"{label}/grad_input", g_out[0], g_ref[0], dtype, extra)
        report.compare(f"{label}/grad_weight", g_out[1], g_ref[1][sl], dtype, extra)
        if bias:
            report.compare(f"{label}/grad_bias", g_out[2], g_ref[2][sl], dtype, extra)
        report.output(f"{label}/grad_input", g_out[0])
    # R-Drop with every option, and on a softcapped head
    rdrop_cases = {"rdrop": dict(alpha=0.7, label_smoothing=0.15, z_loss=0.02),
                   "rdrop/softcap": dict(alpha=0.7, z_loss=0.02, softcap=1.5),
                   "rdrop/softcap+smoothing": dict(alpha=0.7, label_smoothing=0.15, softcap=1.5)}
    for case, kwargs in rdrop_cases.items():
        label = f"options/{tag}/{case}"
        full, part = _leaves(problem, dtype), _leaves(problem, dtype, sl)
        second_full = problem["h2"].to(dtype).clone().requires_grad_()
        second_part = problem["h2"].to(dtype).clone().requires_grad_()
        ref = dropreg.rdrop_linear_cross_entropy(full[0], second_full, full[1], target, linear_bias=full[2],
                                                 weight=class_weight, backend=tiles("torch"), **kwargs)
        out = dropreg.rdrop_linear_cross_entropy(part[0], second_part, part[1], target, linear_bias=part[2],
                                                 weight=class_weight[sl], process_group=group, backend=tiles(local),
                                                 **kwargs)
        for name, o, r in zip(("ce1", "ce2", "kl", "loss", "z_loss"), out, ref):
            report.compare(f"{label}/{name}", o, r, dtype)
            report.output(f"{label}/{name}", o)
        leaves_ref, leaves_out = (full[0], second_full, full[1], full[2]), (part[0], second_part, part[1], part[2])
        g_ref = _grads([ref.loss], [torch.ones(())], leaves_ref)
        g_out = _grads([out.loss], [torch.ones(())], leaves_out)
        for name, o, r in zip(("grad_input1", "grad_input2"), g_out, g_ref):
            report.compare(f"{label}/{name}", o, r, dtype)
        report.compare(f"{label}/grad_weight", g_out[2], g_ref[2][sl], dtype)
        report.compare(f"{label}/grad_bias", g_out[3], g_ref[3][sl], dtype)


class _TinyMLP(torch.nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.sites = torch.nn.ModuleList([dropreg.DropoutSite(0.3), dropreg.DropoutSite(0.1)])

    def forward(self, ids):
        return self.sites[1](torch.tanh(self.body(self.sites[0](self.embed(ids)))))


def _site_step(model, ids, target, sl, sharded, group, fused=False, **kwargs):
    """site_regularizers, or with ``fused`` the one call linear_cross_entropy(sites=...) (its ce in the loss too)."""
    model.zero_grad()
    head_w = model.head.weight[sl].detach().clone().requires_grad_() if sharded else model.head.weight
    head_b = model.head.bias[sl].detach().clone().requires_grad_() if sharded else model.head.bias
    hidden = model(ids)
    sites, ps = dropreg.DropoutSite.collect(model)
    group = group if sharded else None
    if fused:
        reg = dropreg.linear_cross_entropy(hidden, head_w, target, linear_bias=head_b, p=0.0, sites=sites, site_p=ps,
                                           backend="torch", process_group=group, **kwargs)
        (reg.ce + reg.explicit + 2 * reg.implicit).backward()
    else:
        reg = dropreg.site_regularizers(hidden, head_w, target, sites, linear_bias=head_b, p=ps, backend="torch",
                                        process_group=group, **kwargs)
        (reg.explicit + 2 * reg.implicit).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if not name.startswith("head.")}
    grads["head.weight"] = (head_w.grad if sharded else model.head.weight.grad[sl]).clone()
    grads["head.bias"] = (head_b.grad if sharded else model.head.bias.grad[sl]).clone()
    return reg, grads, hidden


def _site_regularizers_case(rank, sizes, group, problem):
    """A replicated network whose LM head is sliced: values and every parameter gradient. float64 to 1e-12 with
    the draws made across ranks; float32 against float64 within tests/test_sites.py's float32 allowance (relative
    1e-5 for the values, 2e-5 of the largest entry for the gradients), on the float64 draws."""
    sl = vocab_slices(sizes)[rank]
    vocab, dim = sum(sizes), 6
    torch.manual_seed(99)
    model = _TinyMLP(vocab, dim).double()
    ids, target = _on_cpu_then_moved(
        lambda: tuple(torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(s)) for s in (5, 6)))
    target[0, 1] = -100
    ref, ref_grads, hidden = _site_step(model, ids, target, sl, False, group, samples=2, seed=21)
    out, out_grads, _ = _site_step(model, ids, target, sl, True, group, samples=2, seed=21)
    draws = dropreg.sample_targets(hidden.detach(), model.head.weight.detach(), linear_bias=model.head.bias.detach(),
                                   samples=2, seed=21, backend="torch")
    model32 = copy.deepcopy(model).float()
    out32, out32_grads, _ = _site_step(model32, ids, target, sl, True, group, sampled_targets=draws, seed=21)
    errors = {}
    for name in ("explicit", "implicit"):
        r = float(getattr(ref, name))
        errors[f"site_regularizers/{name}"] = (abs(float(getattr(out, name)) - r), 1e-12 * (1 + abs(r)))
        errors[f"site_regularizers/float32/{name}"] = (abs(float(getattr(out32, name)) - r), 1e-5 * (abs(r) + 1e-3))
    for name, g in ref_grads.items():
        scale = float(g.abs().max())
        errors[f"site_regularizers/grad_{name}"] = (float((out_grads[name] - g).abs().max()), 1e-12 * (1 + scale))
        errors[f"site_regularizers/float32/grad_{name}"] = (float((out32_grads[name].double() - g).abs().max()),
                                                            2e-5 * (scale + 1e-3))
    # The fused call on the sliced head against the fused call in one process.
    ref, ref_grads, _ = _site_step(model, ids, target, sl, False, group, fused=True, samples=2, seed=21)
    out, out_grads, _ = _site_step(model, ids, target, sl, True, group, fused=True, samples=2, seed=21)
    for name in ("ce", "explicit", "implicit"):
        r = float(getattr(ref, name))
        errors[f"fused_sites/{name}"] = (abs(float(getattr(out, name)) - r), 1e-12 * (1 + abs(r)))
    for name, g in ref_grads.items():
        errors[f"fused_sites/grad_{name}"] = (float((out_grads[name] - g).abs().max()),
                                              1e-12 * (1 + float(g.abs().max())))
    return errors


def _expect_error(label, fn):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as error:
        return label, type(error).__name__, str(error)
    return label, None, "no error"


def bad_calls(rank, world):
    """Each call is wrong on one or every rank; every rank must raise, and the group must stay usable."""
    sizes = [3, 4, 2][:world]
    problem = make_problem(sizes)
    sl = vocab_slices(sizes)[rank]
    vocab = sum(sizes)
    group = dist.group.WORLD
    h, w = problem["h"], problem["w"][sl]
    target = problem["target"]
    outcomes = []

    def lce(**overrides):
        args = dict(input=h, linear_weight=w, target=target, process_group=group)
        args.update(overrides)
        return lambda: dropreg.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"),
                                                    **args)

    beyond = target.clone()
    beyond[0, 0] = vocab  # the slices add up to less than the targets' range
    outcomes.append(_expect_error("target beyond the slices", lce(target=beyond)))
    negative = target.clone()
    negative[0, 0] = -3
    outcomes.append(_expect_error("negative target", lce(target=negative)))
    wide = torch.randn(w.shape[0], h.shape[-1] + 1, dtype=torch.float64)
    outcomes.append(_expect_error("mismatched d on the last rank",
                                  lce(linear_weight=wide if rank == world - 1 else w)))
    outcomes.append(_expect_error("reduction differs on rank 0",
                                  lce(reduction="sum" if rank == 0 else "mean")))
    other = target.clone()
    other[1, 1] = (int(other[1, 1]) + 1) % vocab if rank == 1 else other[1, 1]
    outcomes.append(_expect_error("target differs on rank 1", lce(target=other)))
    outcomes.append(_expect_error("input differs on rank 1", lce(input=h + 1e-9 if rank == 1 else h)))
    outcomes.append(_expect_error("input dtype differs on rank 1",
                                  lce(input=h.float() if rank == 1 else h,
                                      linear_weight=w.float() if rank == 1 else w)))
    outcomes.append(_expect_error("unsupported backend on rank 0",
                                  lce(backend="reference" if rank == 0 else "auto")))
    outcomes.append(_expect_error("sampled target beyond the slices", lambda: dropreg.site_regularizers(
        h.clone().requires_grad_(), w, target, [h.clone().requires_grad_()], sampled_targets=beyond[None],
        process_group=group)))
    signs = torch.ones_like(h)
    signs[0, 0, 0] = -1.0 if rank == 1 else 1.0
    outcomes.append(_expect_error("explicit signs differ on rank 1", lce(signs=signs)))
    site = h.clone().requires_grad_()
    moved = (site * (1 + 1e-12 * (rank == 2))).detach().requires_grad_()
    outcomes.append(_expect_error("a site differs on rank 2", lambda: dropreg.site_regularizers(
        h.clone().requires_grad_(), w, target, [moved], seed=1, process_group=group)))
    outcomes.append(_expect_error("label_smoothing differs on rank 1",
                                  lce(label_smoothing=0.1 if rank == 1 else 0.0)))
    outcomes.append(_expect_error("class weights on rank 0 only",
                                  lce(weight=torch.ones(w.shape[0], dtype=torch.float64) if rank == 0 else None)))
    outcomes.append(_expect_error("class weights of the full head on rank 2",
                                  lce(weight=torch.ones(vocab if rank == 2 else w.shape[0], dtype=torch.float64))))
    outcomes.append(_expect_error("softcap on rank 1 only", lce(softcap=30.0 if rank == 1 else None)))
    # After all those errors the group still works:
    out = dropreg.linear_cross_entropy(h, w, target, seed=3, process_group=group)
    return outcomes, float(out.loss)


def missing_process_group(rank, world):
    """Rank 0 passes process_group, rank 1 does not: rank 0 must raise within the handshake timeout."""
    dropreg.distributed.set_handshake_timeout(3.0)
    sizes = [5, 6]
    problem = make_problem(sizes)
    sl = vocab_slices(sizes)[rank]
    group = dist.group.WORLD if rank == 0 else None
    outcome = _expect_error("missing process_group", lambda: dropreg.linear_cross_entropy(
        problem["h"], problem["w"][sl], problem["target"], seed=3, process_group=group))
    if rank == 1:
        import time
        time.sleep(5)  # stay alive so that rank 0 sees a timeout rather than a closed connection
    return outcome


def edge_cases(rank, world):
    """An empty batch, a batch of ignored rows, and a slice masked entirely by -inf bias, against one process."""
    group = dist.group.WORLD
    sizes = [3, 4, 2][:world]
    sl = vocab_slices(sizes)[rank]
    gen = torch.Generator().manual_seed(8)
    w_full, h_full = _on_cpu_then_moved(lambda: (torch.randn(sum(sizes), 4, generator=gen, dtype=torch.float64),
                                                 torch.randn(3, 4, generator=gen, dtype=torch.float64)))
    b_full = torch.zeros(sum(sizes), dtype=torch.float64)
    b_full[vocab_slices(sizes)[-1]] = float("-inf")  # the last rank's classes are all masked
    cases = {"empty": (h_full[:0], torch.zeros(0, dtype=torch.long), None),
             "all ignored": (h_full, torch.full((3,), -100), None),
             "masked slice": (h_full, torch.tensor([0, 1, 2]), b_full)}
    errors = {}
    for name, (h, target, bias) in cases.items():
        values = []
        for sharded in (False, True):
            hidden = h.clone().requires_grad_()
            weight = (w_full[sl] if sharded else w_full).clone().requires_grad_()
            b = None if bias is None else (bias[sl] if sharded else bias)
            out = dropreg.linear_cross_entropy(hidden, weight, target, linear_bias=b, p=0.2, seed=1,
                                               process_group=group if sharded else None)
            out.loss.backward()
            values.append((out.loss.detach(), hidden.grad, weight.grad if sharded else weight.grad[sl]))
        for label, ours, ref in zip(("loss", "grad_input", "grad_weight"), values[1], values[0]):
            finite = bool(torch.isfinite(ours).all())
            err = float((ours - ref).abs().max()) if ref.numel() else 0.0
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            errors[f"{name}/{label}"] = (err if finite else float("inf"), 1e-12 * (1 + scale))
    # Second derivatives through a sharded op are refused on every rank, as in one process.
    for local in local_backends():
        hidden = h_full.clone().requires_grad_()
        out = dropreg.linear_cross_entropy(hidden, w_full[sl].clone().requires_grad_(), torch.tensor([0, 1, 2]),
                                           seed=1, process_group=group, backend=local)
        (grad,) = torch.autograd.grad(out.loss, hidden, create_graph=True)
        try:
            grad.sum().backward()
            refused = False
        except RuntimeError as error:
            refused = "double backward" in str(error)
        errors[f"double backward refused/{local}"] = (0.0 if refused else 1.0, 0.0)
    # The loss options' payload (docs/math.md 12.3), (forward, backward) bytes on top of the op's own: the targets'
    # [W_y | b_y | w_y] and, with smoothing, the class sums [V W~ | V b~ | V wbar]; nothing more in the backward.
    # A softcap adds one value per row (q . W_y^2, docs/math.md 12.6); smoothing on a capped head the targets'
    # [W_y | b_y], the slices' sums [S | Sq | Ss] and, backward, their parts of grad_input (docs/math.md 3.7).
    n, d, e = h_full.shape[0], h_full.shape[1], 8
    cases = {
        "no options": ({}, (0, 0)),
        "weight+smoothing+z_loss": (dict(weight=torch.rand(w_full[sl].shape[0], dtype=torch.float64) + 0.5,
                                         label_smoothing=0.1, z_loss=0.01), (n * (d + 2) * e + (d + 2) * e, 0)),
        "weight only": (dict(weight=torch.ones(w_full[sl].shape[0], dtype=torch.float64)), (n * e, 0)),
        "softcap": (dict(softcap=2.0), (n * e, 0)),
        "softcap+smoothing": (dict(softcap=2.0, label_smoothing=0.1), (n * e + n * (d + 1) * e + 3 * n * e, n * d * e)),
        # with class weights: w_y per row, and wbar alone of the class sums
        "softcap+weight+smoothing": (dict(softcap=2.0, label_smoothing=0.1,
                                          weight=torch.rand(w_full[sl].shape[0], dtype=torch.float64) + 0.5),
                                     (n * e + n * (d + 2) * e + e + 3 * n * e, n * d * e)),
        # cross entropy alone (its own 3 N e and N d e): S rides in the capped op's packed all-reduce, and the
        # backward adds nothing
        "softcap+smoothing/ce-only": (dict(softcap=2.0, label_smoothing=0.1, explicit=False, implicit=False),
                                      (n * (d + 1) * e + n * e, 0)),
    }
    for name, (options, added) in cases.items():
        hidden = h_full.clone().requires_grad_()
        with dropreg.distributed.count_communication() as log:
            out = dropreg.linear_cross_entropy(hidden, w_full[sl].clone().requires_grad_(), torch.tensor([0, 1, 2]),
                                               linear_bias=torch.zeros(w_full[sl].shape[0], dtype=torch.float64),
                                               p=0.2, seed=1, process_group=group, **options)
            out.loss.backward()
        ce_only = options.get("explicit") is False and options.get("implicit") is False
        expected = ((3 if ce_only else 2 * d + 4) * n * e + added[0], n * d * e + added[1])
        errors[f"option bytes/{name}"] = (float(abs(log.bytes["forward"] - expected[0])
                                                + abs(log.bytes["backward"] - expected[1])), 0.0)
    h = h_full
    ref = dropreg.sample_targets(h, w_full, linear_bias=b_full, samples=4, seed=3, backend="torch")
    out = dropreg.sample_targets(h, w_full[sl], linear_bias=b_full[sl], samples=4, seed=3, process_group=group)
    errors["masked slice/sample_targets"] = (float((out != ref).sum()), 0.0)
    return errors


# ------------------------------------------------------------------------------------------------ memory


def sliced_head_under_cap(rank, world, n_rows, dim, vocab_per_rank, cap_mib, backends):
    """Every rank's slice holds ``vocab_per_rank`` classes, so its own logits would be n_rows x vocab_per_rank; the
    rank's address space is capped at ``cap_mib`` above its size once inputs, threads and the group's buffers exist.
    Runs both terms and R-Drop forward+backward per local backend, then checks that the cap forbids the slice's
    logits. Returns ``{label: (ok, detail)}``."""
    import resource

    from memory_probe import vm_size_bytes
    group = dist.group.WORLD
    # A 64 MiB workspace (the CPU default is 256 MiB), as in tests/memory_probe.py: the workspace is bounded by
    # whatever is set, and the cap's margin then tells it from an N x V allocation.
    dropreg.set_workspace_bytes(64 << 20, "cpu")
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(n_rows, dim, generator=gen)
    h2 = h + 0.1 * torch.randn(n_rows, dim, generator=gen)
    w = torch.randn(vocab_per_rank, dim, generator=torch.Generator().manual_seed(100 + rank)) / dim**0.5
    target = torch.randint(0, vocab_per_rank * world, (n_rows,), generator=gen)

    def step(rows, backend):
        leaves = [t[:rows].clone().requires_grad_() for t in (h, h2)] + [w.clone().requires_grad_()]
        out = dropreg.linear_cross_entropy(leaves[0], leaves[2], target[:rows], seed=0,
                                           backend=backend, process_group=group)
        rdrop = dropreg.rdrop_linear_cross_entropy(leaves[0], leaves[1], leaves[2], target[:rows], backend=backend,
                                                   process_group=group)
        (out.loss + rdrop.loss).backward()
        return float(out.loss + rdrop.loss), bool(torch.isfinite(leaves[2].grad).all())

    for backend in backends:  # warm-up: threads, malloc arenas and gloo's buffers before the cap
        step(8, backend)
    cap = vm_size_bytes() + cap_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    results = {}
    for backend in backends:
        try:
            value, finite = step(n_rows, backend)
            results[backend] = (finite and math.isfinite(value), f"loss {value:.4f}")
        except (RuntimeError, MemoryError) as error:
            results[backend] = (False, str(error).splitlines()[0][:200])
    try:
        logits = h @ w.T
        results["materialized logits"] = (True, f"{tuple(logits.shape)} fit under the cap")
    except (RuntimeError, MemoryError) as error:
        results["materialized logits"] = (False, str(error).splitlines()[0][:200])
    dist.barrier(group)
    return results
