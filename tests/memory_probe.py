"""Run one fused forward+backward under an address-space cap; print a JSON line with the outcome.

Usage: python memory_probe.py OP BACKEND N d V CAP_MIB, OP being linear_ce, ce_only (cross entropy alone),
softcap_zloss (all terms of a softcapped head with z-loss), softcap_smoothing (the same with label smoothing and
class weights: its own streamed sums), softcap_ce_only (cross entropy alone of a capped head, with smoothing, class
weights and z-loss), options and options_ce_only (the uncapped head with label smoothing, class weights and z-loss,
both terms or cross entropy alone), sample_targets (one streamed draw per row), rdrop, rdrop_softcap, sites (a
training step with an inner dropout site through the fused call linear_cross_entropy(sites=...): both every-site
terms) or sites-implicit (site_regularizers' implicit term only). Used by test_memory.py in a subprocess, so the cap
(``resource.setrlimit(RLIMIT_AS)``) binds only this process. The cap is set *after* torch, the inputs and
the thread pools exist, as that much address space above the current size.
"""
import json
import resource
import sys
import time

import torch

import dropreg


def vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def triton_step(op, h, h2, w):
    """Forward and backward through the Triton launchers (what the registered ops run) with large tiles, only
    so that the interpreter (per-program Python overhead) finishes in seconds; the launchers' buffers do not
    depend on the tiles. Returns ``step(rows, vocab_rows, targets) -> (loss, grad_weight)`` for the mean of
    the op's per-row terms (no coefficients)."""
    from dropreg.triton import ops, utils

    grid_tiles = utils.TileConfig(128, 2048, 32, 1, 1)
    plan = utils.launch_plan(torch.float32, h.device).with_tiles(
        **{kernel: grid_tiles for kernel in utils.GPU_CONFIGS if kernel != "row_terms"},
        row_terms=utils.TileConfig(256, 1, 32, 1, 1))

    def step(rows, vocab_rows, targets):
        upstream = [torch.full((rows,), 1.0 / rows) for _ in range(3)]
        with torch.no_grad():
            if op == "rdrop":
                terms, grads = ops.rdrop_step(h[:rows], h2[:rows], w[:vocab_rows], None, targets, upstream, plan=plan)
            else:
                terms, grads = ops.linear_ce_step(h[:rows], w[:vocab_rows], None, targets, upstream, plan=plan)
        return sum(term.mean() for term in terms).item(), grads[-2]

    return step


def main():
    op, backend, (n_rows, dim, vocab, cap_mib) = sys.argv[1], sys.argv[2], map(int, sys.argv[3:7])
    torch.manual_seed(0)
    # A 64 MiB logits workspace (the default is 256 MiB): the CE-only path must keep to whatever bound is set, and
    # the probe's margin (test_memory.py) then tells a workspace from an N x V allocation.
    dropreg.set_workspace_bytes(64 << 20, "cpu")
    h = torch.randn(n_rows, dim, requires_grad=True)
    w = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    y = torch.randint(0, vocab, (n_rows,))
    h2 = (h.detach() + 0.1 * torch.randn_like(h)).requires_grad_()

    body = (torch.randn(dim, dim) / dim**0.5).requires_grad_()

    def loss(rows, vocab_rows, targets):
        if op.startswith("sites"):
            site = h[:rows] * 1.0  # the activation where dropout would act, inside the graph
            hidden = torch.tanh(site @ body)
            if op == "sites":  # the fused call: cross entropy and the site terms over one pass
                return dropreg.linear_cross_entropy(hidden, w[:vocab_rows], targets, p=0.0, sites=[site], site_p=0.3,
                                                    seed=0, backend=backend).loss
            ce = dropreg.linear_cross_entropy(hidden, w[:vocab_rows], targets, explicit=False, implicit=False,
                                              backend=backend).ce
            reg = dropreg.site_regularizers(hidden, w[:vocab_rows], targets, [site], p=0.3, seed=0,
                                            explicit=False, backend=backend)
            return ce + reg.explicit + reg.implicit
        if op == "ce_only":  # gradients formed in the forward, one workspace of row-block logits at a time
            return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, explicit=False, implicit=False,
                                                backend=backend).loss
        if op == "softcap_zloss":  # the capped head's own streamed driver, with z-loss's mu gradient
            return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, softcap=30.0, z_loss=1e-4,
                                                backend=backend, seed=0).loss
        if op == "softcap_smoothing":  # ... and smoothing's capped sums (dropreg/softcap.py, CappedSmoothingSums)
            return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, softcap=30.0, z_loss=1e-4,
                                                label_smoothing=0.1, weight=torch.ones(vocab_rows) * 0.5,
                                                backend=backend, seed=0).loss
        if op == "softcap_ce_only":  # the CE-only path with the cap in its workspace
            return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, softcap=30.0, z_loss=1e-4,
                                                label_smoothing=0.1, weight=torch.ones(vocab_rows) * 0.5,
                                                explicit=False, implicit=False, backend=backend).loss
        if op in ("options", "options_ce_only"):  # the uncapped per-row and CE-only paths with every loss option
            both_terms = op == "options"
            return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, z_loss=1e-4, label_smoothing=0.1,
                                                weight=torch.ones(vocab_rows) * 0.5, explicit=both_terms,
                                                implicit=both_terms, backend=backend, seed=0).loss
        if op in ("rdrop", "rdrop_softcap"):  # rdrop_softcap: the streamed passes with the cap
            return dropreg.rdrop_linear_cross_entropy(h[:rows], h2[:rows], w[:vocab_rows], targets, backend=backend,
                                                      softcap=30.0 if op == "rdrop_softcap" else None).loss
        return dropreg.linear_cross_entropy(h[:rows], w[:vocab_rows], targets, backend=backend, seed=0).loss

    def step(rows, vocab_rows, targets):
        if op == "sample_targets":  # no gradient: the draws' mean, and a stand-in "gradient" that is finite
            drawn = dropreg.sample_targets(h[:rows].detach(), w[:vocab_rows].detach(), samples=1, seed=0,
                                           backend=backend)
            return drawn.double().mean().item(), torch.zeros(1)
        w.grad = h.grad = h2.grad = None
        value = loss(rows, vocab_rows, targets)
        value.backward()
        return value.item(), w.grad

    if backend == "triton":  # under TRITON_INTERPRET=1, given by the caller
        step = triton_step(op, h, h2, w)
    # Warm-up on a tiny problem: starts intra-op threads and their malloc arenas before the cap.
    step(8, 64, y[:8] % 64)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cap = vm_size_bytes() + cap_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    try:
        value, grad_w = step(n_rows, vocab, y)
        result = dict(ok=True, loss=value, grad_finite=bool(torch.isfinite(grad_w).all()))
    except (RuntimeError, MemoryError) as error:
        result = dict(ok=False, error=str(error).splitlines()[0][:200])
    result.update(seconds=round(time.perf_counter() - start, 2),
                  peak_rss_growth_mib=round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                                             - rss_before) / 2**20, 1),
                  logits_mib=n_rows * vocab * 4 / 2**20, cap_mib=cap_mib)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
