#!/usr/bin/env python3
"""Mutation test: perturb one coefficient or term of one backend at a time and check that the tests fail.

Each mutant replaces one short snippet in its file, located by the snippet itself when it occurs once there, or by
an ``anchor`` (a line of context that occurs once, e.g. ``def capped_sweep(``) and the snippet's first occurrence
after it; the script refuses to run a mutant it cannot locate, so the list below is kept in step with the code and
a refactor that moves code only has to keep the anchors. For each mutant the repository's tracked files
(working-tree contents) are copied into a fresh temporary directory, the one edit is applied there, and a
focused pytest selection for that backend runs in the copy. Verdicts:

* KILLED: the selection failed (the first failing test is recorded);
* SURVIVED: every selected test passed: the tests are too weak to see this bug;
* ERROR: the mutant did not import or build, or pytest did not run tests: not a valid mutant.

Most perturbations are small (a coefficient 2 -> 2.001, a relative 1e-5 on one term), not sign flips: the
point is that the oracle tolerances are tight enough to catch a regularizer bug. Before the mutants, each
selection runs once on the unmutated copy and must pass (else a "kill" would mean nothing).

Isolation: every mutant gets its own TORCH_EXTENSIONS_DIR and Triton cache, so the C++ kernels are
JIT-built from the mutated csrc/; a sitecustomize.py drops any editable install of dropreg from the import
system so that neither the package nor a prebuilt ``dropreg._C`` can come from another checkout.

Usage: python tools/mutation_test.py [--backend NAME] [--only ID] [--list] [--out FILE]
Exit status: 0 if every mutant was killed, 1 if one survived or was invalid, 2 if a baseline failed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

# --------------------------------------------------------------------------------------------------------
# The mutants: (id, backend, file, original snippet, replacement, description).
# Keep snippets to one expression so that renames elsewhere need only a quick update here.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    id: str
    backend: str
    file: str
    original: str
    replacement: str
    description: str
    anchor: Optional[str] = None  # context that occurs once; the snippet is its first occurrence after it


MUTANTS = [
    # reference (dropreg/reference.py): the readable definition; the float64 oracle is independent of it.
    Mutant("ref-var", "reference", "dropreg/reference.py",
           "var = probs @ (w * w) - mu * mu", "var = probs @ (w * w) - 1.00001 * mu * mu",
           "explicit forward: var = m2 - (1+1e-5) mu^2"),
    Mutant("ref-kl", "reference", "dropreg/reference.py",
           "kl = 0.5 * ((log_probs[0]", "kl = 0.50001 * ((log_probs[0]",
           "R-Drop KL: 0.5 -> 0.50001"),

    # public layer (dropreg/_api.py): coefficients, reductions, ignored rows.
    Mutant("api-implicit-coef", "api", "dropreg/_checks.py",
           "return kappa / 2.0, math.sqrt(kappa)", "return kappa / 2.0, math.sqrt(kappa) * 1.00001",
           "default implicit coefficient sqrt(kappa) * (1+1e-5)"),
    Mutant("api-explicit-scale", "api", "dropreg/_api.py",
           "reduce(explicit_coef * quadratic)", "reduce(explicit_coef * 1.00001 * quadratic)",
           "explicit coefficient applied as c_R * (1+1e-5)"),
    Mutant("api-implicit-scale", "api", "dropreg/_api.py",
           "reduce(implicit_coef * sign_term)", "reduce(implicit_coef * 1.00001 * sign_term)",
           "implicit coefficient applied as c_I * (1+1e-5)"),
    Mutant("api-lce-ignore-index", "api", "dropreg/_api.py",
           "rows = IgnoredRows(target, ignore_index, input.dtype)", "rows = IgnoredRows(target, -100, input.dtype)",
           "linear_cross_entropy ignores the rows marked -100, not those marked ignore_index"),
    Mutant("api-rdrop-ignore-index", "api", "dropreg/_api.py",
           "rows = IgnoredRows(target, ignore_index, input1.dtype)", "rows = IgnoredRows(target, -100, input1.dtype)",
           "R-Drop ignores the rows marked -100, not those marked ignore_index"),
    Mutant("api-module-ignore-index", "api", "dropreg/nn.py",
           "            ignore_index=self.ignore_index, reduction=self.reduction, weight=self.weight,",
           "            reduction=self.reduction, weight=self.weight,",
           "LinearCrossEntropyLoss does not pass its ignore_index on"),
    Mutant("api-mean-count", "api", "dropreg/_api.py",
           "self.count = self.valid.sum().clamp(min=1)", "self.count = torch.tensor(self.valid.numel()).clamp(min=1)",
           "'mean' divides by all rows, ignored ones included"),
    Mutant("api-ignored-rows", "api", "dropreg/_api.py",
           "per_row = torch.where(self.valid, per_row, torch.zeros_like(per_row))", "per_row = per_row",
           "ignored rows are not masked out of the per-row terms"),

    # torch backend (dropreg/streamed.py).
    Mutant("torch-ce", "torch", "dropreg/rows.py",
           "ce = lse - z_target", "ce = lse - 1.00001 * z_target",
           "cross entropy forward: lse - (1+1e-5) z_y"),
    Mutant("torch-var", "torch", "dropreg/reducers.py",
           "var = stats.m2 - stats.mu * stats.mu", "var = stats.m2 - 1.00001 * stats.mu * stats.mu",
           "explicit forward: var = m2 - (1+1e-5) mu^2"),
    Mutant("torch-sign-term", "torch", "dropreg/rows.py",
           "(u * (mu - target_part)).sum(1)", "(u * (mu - 1.00001 * target_part)).sum(1)",
           "implicit forward: sigma h (mu - (1+1e-5) W[y])"),
    Mutant("torch-T-coef", "torch", "dropreg/rows.py",
           "T_vec -= 2 * g_r_q * mu_b", "T_vec -= 2.001 * g_r_q * mu_b",
           "logit gradient: the 2 in T = gI' u - 2 gR' q mu -> 2.001"),
    Mutant("torch-G-sign", "torch", "dropreg/rows.py",
           "row_const -= (g_i * mu_b * u).sum(1)", "row_const += (g_i * mu_b * u).sum(1)",
           "logit gradient: sign of the implicit row constant -gI' abar"),
    Mutant("torch-grad-h-row", "torch", "dropreg/rows.py",
           "out += 2 * g_r[:, None] * hc * var", "out += 2.001 * g_r[:, None] * hc * var",
           "grad_input row term 2 gR' h var -> 2.001"),
    Mutant("torch-grad-w-2W", "torch", "dropreg/streamed.py",
           "g_w += 2 * w * st_T_stack[:, dim:]", "g_w += 2.001 * w * st_T_stack[:, dim:]",
           "grad_weight term 2 W * (S^T gR' q) -> 2.001"),
    Mutant("torch-grad-w-scatter", "torch", "dropreg/streamed.py",
           "grad_w.index_add_(0, y, -g_i_owned * rows.u)", "grad_w.index_add_(0, y, -1.00001 * g_i_owned * rows.u)",
           "grad_weight implicit target scatter -gI' u * (1+1e-5)"),
    Mutant("torch-grad-b", "torch", "dropreg/streamed.py",
           "grad_b[v0:v1] += g_logits.sum(0)", "grad_b[v0:v1] += 1.00001 * g_logits.sum(0)",
           "grad_bias = sum G * (1+1e-5)", anchor="def logit_gradient_sweep("),
    Mutant("torch-rescale", "torch", "dropreg/tiles.py",
           "rescale = torch.exp(self.max - shift)", "rescale = torch.exp(1.00001 * (self.max - shift))",
           "online softmax: rescale e^{m - m'} off by 1e-5 in the exponent"),
    Mutant("torch-rdrop-kl", "torch", "dropreg/ops.py",
           "0.5 * (expected_d[0] - expected_d[1])", "0.50001 * (expected_d[0] - expected_d[1])",
           "R-Drop KL forward: 0.5 -> 0.50001"),
    Mutant("torch-rdrop-grad", "torch", "dropreg/streamed.py",
           "expected_d[0, r0:r1, None] + 1)", "expected_d[0, r0:r1, None] + 1.00001)",
           "R-Drop dKL/dz1: the p1 term (+1 -> +1.00001)"),
    Mutant("torch-rdrop-rescale", "torch", "dropreg/streamed.py",
           "partial_d[i] = partial_d[i] * rescale +", "partial_d[i] = partial_d[i] +",
           "R-Drop forward: E_p[D] accumulator not rescaled when the max grows"),

    # chunked backend (dropreg/chunked.py, dropreg/triton/epilogues.py).
    # A reference moves only when a chunk rises more than the headroom (48) above it, so what earlier chunks left is
    # at most e^-48 of the row's mass afterwards: a relative error in its rescale is invisible, half its exponent not.
    Mutant("chunked-rescale", "chunked", "dropreg/chunked.py",
           "moments[moved] * rescale[moved, None]", "moments[moved] * rescale[moved, None].sqrt()",
           "moments: the moved rows' earlier chunks rescaled by half the exponent (e^{(m - m')/2})"),
    Mutant("chunked-top", "chunked", "dropreg/chunk_buffers.py",
           "share = (self.exact / mass)[:, None]", "share = (self.exact * 1.001 / mass)[:, None]",
           "bf16 forward: the dominant entry's exact share of the moments * (1+1e-3)"),
    Mutant("chunked-mass", "chunked", "dropreg/chunked.py",
           "mass if narrow else running_sum", "mass * 1.001 if narrow else running_sum",
           "bf16 forward: moments normalized by the rounded mass * (1+1e-3)"),
    Mutant("chunked-2W", "chunked", "dropreg/chunk_buffers.py",
           "rows.addcmul_(weight, s_g_r_q, value=2.0)", "rows.addcmul_(weight, s_g_r_q, value=2.001)",
           "grad_weight term 2 W * (S^T gR' q) -> 2.001"),
    Mutant("chunked-scatter", "chunked", "dropreg/torch_epilogues.py",
           "(target, -g_i_target[:, None] * rows.u)", "(target, -1.00001 * g_i_target[:, None] * rows.u)",
           "grad_weight implicit target scatter -gI' u * (1+1e-5)"),
    Mutant("chunked-torch-G", "chunked", "dropreg/torch_epilogues.py",
           "t.add_(row_const[:, None]).mul_(probs)", "t.add_(row_const[:, None] * 1.00001).mul_(probs)",
           "PyTorch gradient epilogue: row constant * (1+1e-5)"),
    Mutant("chunked-torch-rdrop", "chunked", "dropreg/torch_epilogues.py",
           "weighted_d[i] = weighted_d[i] * rescale +", "weighted_d[i] = weighted_d[i] +",
           "PyTorch R-Drop epilogue: E_p[D] accumulator not rescaled when the max grows"),
    Mutant("chunked-ce-z", "chunked", "dropreg/streamed.py",
           "return w_row + 2 * z_row * lse", "return w_row + 2.001 * z_row * lse",
           "CE-only paths (add_ce_loss, shared with torch): the z-loss's 2 zw lse -> 2.001"),
    Mutant("chunked-triton-t", "chunked", "dropreg/triton/epilogues.py",
           "        modulation += t", "        modulation += 1.00001 * t",
           "Triton gradient epilogue: t * (1+1e-5)"),
    Mutant("chunked-top-gw", "chunked", "dropreg/chunk_buffers.py",
           "part = rows.T_vec + 2.0 * rows.g_r_q * w_top", "part = rows.T_vec + 2.002 * rows.g_r_q * w_top",
           "bf16 backward: the dominant class's exact grad_W part, 2 gR' q W_k * (1+1e-3)"),
    Mutant("chunked-top-t", "chunked", "dropreg/chunk_buffers.py",
           "t_top = (rows.T_stack * (", "t_top = 1.001 * (rows.T_stack * (",
           "bf16 backward: the dominant class's exact t * (1+1e-3)"),
    Mutant("chunked-triton-rescale", "chunked", "dropreg/triton/epilogues.py",
           "rescale = tl.exp(old_max - shift)", "rescale = tl.exp(0.5 * (old_max - shift))",
           "Triton softmax epilogue: the rescale of a moved reference at half its exponent (see chunked-rescale)"),
    Mutant("chunked-rescale-skip", "chunked", "dropreg/chunked.py",
           "if len(moved):", "if False:",
           "forward: the moments never rescaled when a row's reference moves"),
    Mutant("chunked-torch-colsums", "chunked", "dropreg/torch_epilogues.py",
           "grad_b += g.sum(dim=0)", "grad_b += 1.001 * g.sum(dim=0)",
           "PyTorch gradient epilogue: G's column sums for grad_b * (1+1e-3)"),
    Mutant("chunked-triton-colsums", "chunked", "dropreg/triton/epilogues.py",
           "tl.sum(tl.where(inside, g, 0.0), axis=0)", "1.001 * tl.sum(tl.where(inside, g, 0.0), axis=0)",
           "Triton gradient epilogues: a row tile's column sums for grad_b * (1+1e-3)"),
    Mutant("chunked-triton-online", "chunked", "dropreg/triton/epilogues.py",
           "online_sum = online_sum * tl.exp(chunk_max - running)",
           "online_sum = online_sum * 1.001 * tl.exp(chunk_max - running)",
           "Triton lse-only softmax epilogue: the one-pass sum's rescale * (1+1e-3)"),
    Mutant("chunked-triton-rdrop", "chunked", "dropreg/triton/epilogues.py",
           "k * (diff - ed1 + 1.0)", "k * (diff - ed1 + 1.00001)",
           "Triton R-Drop gradient epilogue: dKL/dz1's p1 term (+1 -> +1.00001)"),
    Mutant("chunked-triton-no-move", "chunked", "dropreg/triton/epilogues.py",
           "new_max = tl.where(chunk_max > start + HEADROOM, chunk_max, start)", "new_max = start",
           "Triton softmax epilogue: a reference never moves, however far a chunk rises above it"),
    Mutant("chunked-triton-no-redo", "chunked", "dropreg/triton/epilogues.py",
           "if tl.max((new_max != start).to(tl.int32), axis=0) > 0:", "if False:",
           "Triton softmax epilogue: probabilities not rewritten where a reference moved"),
    Mutant("chunked-triton-var", "chunked", "dropreg/triton/row_kernels.py",
           "var = m2 - mu * mu", "var = m2 - 1.00001 * mu * mu",
           "Triton row finish: var = m2 - (1+1e-5) mu^2"),
    Mutant("chunked-triton-top", "chunked", "dropreg/triton/row_kernels.py",
           "mu = (a1 - seen * w_seen) / norm[:, None] + share * w_exact",
           "mu = (a1 - seen * w_seen) / norm[:, None] + 1.001 * share * w_exact",
           "Triton row finish: the dominant entry's exact share of mu * (1+1e-3)"),
    Mutant("chunked-triton-sign-term", "chunked", "dropreg/triton/row_kernels.py",
           "sign_term += tl.sum(u * (mu - w_target), axis=1)",
           "sign_term += tl.sum(u * (mu - 1.00001 * w_target), axis=1)",
           "Triton row finish: sigma h (mu - (1+1e-5) W[y])"),
    Mutant("chunked-triton-T", "chunked", "dropreg/triton/row_kernels.py",
           "T -= 2.0 * g_r_q * mu", "T -= 2.001 * g_r_q * mu",
           "Triton sweep rows: the 2 in T = gI' u - 2 gR' q mu -> 2.001"),
    Mutant("chunked-triton-grad-h-row", "chunked", "dropreg/triton/row_kernels.py",
           "grad_h += 2.0 * g_r * h * var", "grad_h += 2.001 * g_r * h * var",
           "Triton sweep rows: grad_input's row term 2 gR' h var -> 2.001"),
    Mutant("chunked-triton-2W", "chunked", "dropreg/triton/row_kernels.py",
           "total += 2.0 * w * tl.load(sq_ptr + at, mask=ok, other=0.0)",
           "total += 2.001 * w * tl.load(sq_ptr + at, mask=ok, other=0.0)",
           "Triton grad_W finish: 2 W * (S^T gR' q) -> 2.001"),
    Mutant("chunked-triton-target-u", "chunked", "dropreg/triton/row_kernels.py",
           "values += signs.to(values.dtype) * h.to(values.dtype)",
           "values += 1.00001 * signs.to(values.dtype) * h.to(values.dtype)",
           "Triton grad_W finish: the implicit term's target rows u = sigma h * (1+1e-5)"),
    Mutant("chunked-keep-squares", "chunked", "dropreg/chunked.py",
           "w_squares = torch.mul(w_op, w_op, out=squares[v0:v1])",
           "w_squares = torch.mul(w_op, w_op, out=squares[v0:v1]).mul_(1.001)",
           "the W*W kept for the backward * (1+1e-3) (the forward's own squares right)"),

    # triton backend (dropreg/triton/), under TRITON_INTERPRET=1.
    Mutant("triton-var", "triton", "dropreg/triton/forward.py",
           "/ mass - mu * mu", "/ mass - 1.00001 * mu * mu",
           "explicit forward: var = m2 - (1+1e-5) mu^2"),
    Mutant("triton-sign-term", "triton", "dropreg/triton/forward.py",
           "tl.sum(signs * h * (mu - w_target.to(ACC)), axis=1)",
           "tl.sum(signs * h * (mu - 1.00001 * w_target.to(ACC)), axis=1)",
           "implicit forward: sigma h (mu - (1+1e-5) W[y])"),
    Mutant("triton-T-coef", "triton", "dropreg/triton/backward.py",
           "T_vec -= 2.0 * g_r_q * mu", "T_vec -= 2.001 * g_r_q * mu",
           "logit gradient: the 2 in T = gI' u - 2 gR' q mu -> 2.001"),
    Mutant("triton-grad-h-row", "triton", "dropreg/triton/backward.py",
           "grad_h += 2.0 * g_r * h * var", "grad_h += 2.001 * g_r * h * var",
           "grad_input row term 2 gR' h var -> 2.001"),
    Mutant("triton-grad-w-2W", "triton", "dropreg/triton/backward.py",
           "grad_w += 2.0 * w.to(ACC) * tl.dot(", "grad_w += 2.001 * w.to(ACC) * tl.dot(",
           "grad_weight term 2 W * (S^T gR' q) -> 2.001"),
    Mutant("triton-rescale", "triton", "dropreg/triton/utils.py",
           "rescale = tl.exp(running_max - shift)", "rescale = tl.exp(1.00001 * (running_max - shift))",
           "online softmax in the kernels: rescale off by 1e-5 in the exponent"),
    Mutant("triton-rdrop-grad", "triton", "dropreg/triton/rdrop.py",
           "(diff - expected2 - 1.0)", "(diff - expected2 - 1.00001)",
           "R-Drop dKL/dz2: the p2 term (-1 -> -1.00001)"),

    # cpu backend (csrc/, passes only: the per-row algebra is rows.py's, mutated above): each mutant is JIT-built in
    # its own TORCH_EXTENSIONS_DIR.
    Mutant("cpu-moments", "cpu", "csrc/vocab_passes.cpp",
           "width, acc_t(1) / softmax[i].sum);", "width, acc_t(1.00001) / softmax[i].sum);",
           "statistics pass: the moments [mu | m2] normalized by L / (1+1e-5)"),
    Mutant("cpu-sweep-T", "cpu", "csrc/vocab_passes.cpp",
           "if (modulated) at::mm_out(grad, T_stack_block, stacked.t());",
           "if (modulated) at::mm_out(grad, T_stack_block, stacked.t()).mul_(1.00001);",
           "gradient sweep: T_stack . [W_v | W_v*W_v] * (1+1e-5)"),
    Mutant("cpu-sweep-target", "cpu", "csrc/vocab_passes.cpp",
           "y[row], v0, cols, amount_ptr[row]);", "y[row], v0, cols, amount_ptr[row] * acc_t(1.00001));",
           "gradient sweep: what G loses at the target * (1+1e-5)"),
    Mutant("cpu-grad-w-2W", "cpu", "csrc/vocab_passes.cpp",
           "tile_w.addcmul_(w, tile_st_T_stack.narrow(1, dim, dim), 2);",
           "tile_w.addcmul_(w, tile_st_T_stack.narrow(1, dim, dim), 2.001);",
           "grad_weight term 2 W * (S^T gR' q) -> 2.001"),
    Mutant("cpu-rescale", "cpu", "csrc/tile_loops.h",
           "const T factor = std::exp(max - shift_of(new_max));",
           "const T factor = std::exp(T(1.00001) * (max - shift_of(new_max)));",
           "online softmax across 256-wide tiles: rescale off by 1e-5 in the exponent"),
    Mutant("cpu-rdrop-grad", "cpu", "csrc/rdrop.cpp",
           "half_kl * (T(1) - expected1)", "half_kl * (T(1.00001) - expected1)",
           "R-Drop dKL/dz1 (vectorized part): the p1 term (+1 -> +1.00001)"),

    # Second tier (same families again, in the slow backends): run last, so that a run cut short by time
    # still covers every family in every backend.
    Mutant("triton-G-sign", "triton", "dropreg/triton/backward.py",
           "row_const -= tl.sum(g_i_u * mu, axis=1)", "row_const += tl.sum(g_i_u * mu, axis=1)",
           "logit gradient: sign of the implicit row constant -gI' abar"),
    Mutant("triton-grad-b", "triton", "dropreg/triton/backward.py",
           "tl.sum(grad_logits, axis=0), mask=cols < V", "tl.sum(grad_logits, axis=0) * 1.00001, mask=cols < V",
           "grad_bias = sum G * (1+1e-5)"),
    Mutant("triton-split-merge", "triton", "dropreg/triton/utils.py",
           "scale = torch.exp(max_parts - shift)", "scale = torch.exp(1.00001 * (max_parts - shift))",
           "exact merge of vocabulary splits: scale off by 1e-5 in the exponent"),
    Mutant("triton-rdrop-kl", "triton", "dropreg/triton/rdrop.py",
           "kl = 0.5 * (expected1 - expected2)", "kl = 0.50001 * (expected1 - expected2)",
           "R-Drop KL forward: 0.5 -> 0.50001"),
    Mutant("cpu-grad-w-T", "cpu", "csrc/vocab_passes.cpp",
           "tile_w.add_(tile_st_T_stack.narrow(1, 0, dim));", "tile_w.add_(tile_st_T_stack.narrow(1, 0, dim), 1.00001);",
           "grad_weight's S^T T part * (1+1e-5)"),
    Mutant("cpu-grad-h", "cpu", "csrc/vocab_passes.cpp",
           "t.grad_h_part.narrow(0, r0, n).addmm_(grad, w);", "t.grad_h_part.narrow(0, r0, n).addmm_(grad, w, 1, 1.00001);",
           "gradient sweep: grad_input's G W * (1+1e-5)"),
    Mutant("cpu-grad-b", "cpu", "csrc/tile_loops.h",
           "column_sums[j] += row[j];", "column_sums[j] += row[j] * T(1.00001);",
           "grad_bias column sums * (1+1e-5) (both ops)"),
    Mutant("cpu-rdrop-expected", "cpu", "csrc/rdrop.cpp",
           "expected_ptr[r0 + i] = weighted1[i] / softmax1[i].sum;",
           "expected_ptr[r0 + i] = weighted1[i] / softmax1[i].sum * acc_t(1.00001);",
           "R-Drop statistics: E_p1[D] * (1+1e-5)"),
    # Every-site ops (dropreg/sites.py and softmax_mean / sample_targets in each backend)
    Mutant("sites-explicit-average", "sites", "dropreg/site_terms.py",
           "(explicit_coefs[k] / n_draws)", "(explicit_coefs[k] * 1.00001 / n_draws)",
           "every-site explicit term: coefficient * (1+1e-5)"),
    Mutant("sites-sign-stream", "sites", "dropreg/site_terms.py",
           "stream=k + 1,", "stream=k + 2,",
           "every-site implicit term: site k takes sign stream k + 2 instead of k + 1"),
    Mutant("sites-ignored-cotangent", "sites", "dropreg/site_terms.py",
           "torch.where(row_mask, mu - weight_rows(c).to(acc), zero)",
           "torch.where(row_mask | True, mu - weight_rows(c).to(acc), zero)",
           "ignored rows keep their cotangent mu - W[t]"),
    Mutant("torch-softmax-mean-row-const", "torch", "dropreg/rows.py",
           "row_const=-(grad_mu_rows * mu_rows).sum(1)", "row_const=-1.00001 * (grad_mu_rows * mu_rows).sum(1)",
           "softmax_mean backward: row constant -mu . gbar * (1+1e-5)"),
    Mutant("signs-gumbel", "sites", "dropreg/signs.py",
           "+ 0.5) * 2.0**-32", "+ 0.25) * 2.0**-32",
           "Gumbel noise: u = (word + 1/4) / 2^32 instead of + 1/2 (a 1e-10 change of the noise: only the stream's known answers see it)"),
    Mutant("cpu-sweep-row-const", "cpu", "csrc/vocab_passes.cpp",
           "lse_ptr[row], row_const_ptr[row], modulated);", "lse_ptr[row], row_const_ptr[row] * acc_t(1.00001), modulated);",
           "gradient sweep: the row constant * (1+1e-5)"),
    Mutant("cpu-sample-tile-offset", "cpu", "csrc/sampling.cpp",
           "best_class[k * n + i] = v0 + j;", "best_class[k * n + i] = j + (v0 > 0 ? v0 - 1 : 0);",
           "sampled targets: the class index of a draw from any vocabulary tile after the first is off by one"),
    Mutant("cpu-gumbel", "cpu", "csrc/sampling.cpp",
           "words[4 * (i + l) + w] = out[w][l];", "words[4 * (i + l) + w] = out[(w + 1) % 4][l];",
           "sampled targets: class v takes word (v + 1) % 4 of its Philox call (the AVX2 rounds)"),

    # CE only with gradients in the forward (csrc/ce_with_grads.cpp, streamed.ce_with_grads) and the loss
    # options (dropreg/loss_options.py), which act on every backend's per-row terms.
    Mutant("ce-cpp-probs", "ce", "csrc/ce_with_grads.cpp",
           "s_i * std::exp(m - lse[i])", "s_i * acc_t(1.00001) * std::exp(m - lse[i])",
           "C++ CE only: G's softmax part scaled by (1+1e-5), the value unchanged"),
    Mutant("ce-cpp-lse", "ce", "csrc/ce_with_grads.cpp",
           "std::log(merged.sum[0])", "std::log(merged.sum[0] * 1.00001)",
           "C++ CE only: lse from the merged sum * (1+1e-5)"),
    Mutant("ce-torch-target", "ce", "dropreg/streamed.py",
           "z.scatter_add_(1, y[:, None], -w_row[:, None])", "z.scatter_add_(1, y[:, None], -1.00001 * w_row[:, None])",
           "torch CE only: the target's -w in G scaled by (1+1e-5)"),
    Mutant("ce-options-factor", "ce", "dropreg/loss_options.py",
           "return (1.0 - self.smoothing) * w_y + self.smoothing * classes.class_weight_mean()",
           "return (1.0 - self.smoothing) * w_y + 1.0001 * self.smoothing * classes.class_weight_mean()",
           "loss options: the row factor's smoothing share * (1+1e-4)"),
    Mutant("ce-options-direction", "ce", "dropreg/loss_options.py",
           "(w_bar * classes.target_row() - classes.mean_row())",
           "(w_bar * classes.target_row() - 1.0001 * classes.mean_row())",
           "loss options: the weighted mean row W~ * (1+1e-4)"),

    # z-loss (docs/math.md 3.5: mu's gradient in every backend) and softcap (3.6: dropreg/softcap.py, csrc/softcap.cpp).
    Mutant("opt-zloss-quadratic", "options", "dropreg/loss_options.py",
           "(lse * var_part + (hc * hc * mu * mu).sum(1))", "(lse * var_part + 1.0001 * (hc * hc * mu * mu).sum(1))",
           "z-loss: the explicit term's 2 c q . mu^2 part * (1+1e-4)"),
    Mutant("opt-zloss-sign", "options", "dropreg/loss_options.py",
           "sign_term + 2 * c * lse * (signs.to(acc) * hc * mu).sum(1)",
           "sign_term + 2.0002 * c * lse * (signs.to(acc) * hc * mu).sum(1)",
           "z-loss: the implicit term's 2 c lse u . mu part * (1+1e-4)"),
    Mutant("opt-rows-grad-mu", "options", "dropreg/rows.py",
           "row_const -= (g_mu * mu[r0:r1]).sum(1)", "row_const -= 1.0001 * (g_mu * mu[r0:r1]).sum(1)",
           "per-row algebra: mu's own gradient, its row constant -mu . gbar * (1+1e-4)"),
    Mutant("opt-triton-grad-mu", "options", "dropreg/triton/backward.py",
           "row_const -= tl.sum(g_mu * mu, axis=1)", "row_const -= 1.0001 * tl.sum(g_mu * mu, axis=1)",
           "Triton row_prep: mu's own gradient, its row constant * (1+1e-4)"),
    Mutant("opt-cpp-ce-zloss", "options", "csrc/ce_with_grads.cpp",
           "w_i + 2 * zw[r0 + i] * lse[i]", "w_i + acc_t(2.0002) * zw[r0 + i] * lse[i]",
           "C++ CE only with z-loss: G's 2 zw lse s part * (1+1e-4)"),
    Mutant("opt-softcap-psi", "options", "dropreg/softcap.py",
           "(c * phi + 2 * c * z2 + z3)", "(c * phi + 2 * c * z2 + 1.001 * z3)",
           "softcap, torch passes: psi's third-derivative part * (1+1e-3)"),
    Mutant("opt-softcap-amount", "options", "dropreg/rows.py",
           "amount += g_r * y.z3 * y.q_ww", "amount += 1.001 * g_r * y.z3 * y.q_ww",
           "softcap: the explicit term's target amount * (1+1e-3)"),
    Mutant("opt-cpp-softcap-psi", "options", "csrc/softcap.cpp",
           "V psi() const { return c * phi() + V(2) * c * z2 + z3; }",
           "V psi() const { return c * phi() + V(2) * c * z2 + V(1.001) * z3; }",
           "softcap, C++ passes: psi's third-derivative part * (1+1e-3)"),
    Mutant("opt-cpp-softcap-m2", "options", "csrc/softcap.cpp",
           "if (ephi_row) store_at(ephi_row + j, d.phi());",
           "if (ephi_row) store_at(ephi_row + j, d.phi() * V(1.0001));",
           "softcap, C++ statistics: M2's weight phi * (1+1e-4)"),
    Mutant("opt-cpp-ce-softcap-slope", "options", "csrc/ce_with_grads.cpp",
           "store_at(z + j, g * (V(1) - t * t));", "store_at(z + j, g * (V(1) - V(1.001) * t * t));",
           "C++ CE only, capped: the cap's derivative 1 - t^2 with t^2 * (1+1e-3)"),
    Mutant("opt-cpp-ce-softcap-smoothing", "options", "csrc/ce_with_grads.cpp",
           "if (omega) g = g - V(smoothing) * load_at(omega + j, V());",
           "if (omega) g = g - V(smoothing) * V(1.001) * load_at(omega + j, V());",
           "C++ CE only, capped: label smoothing's -rs omega in G * (1+1e-3), the loss unchanged"),
]

# Per backend: the pytest arguments (run from the copy's root). Quick, but each includes the float64 oracle
# comparisons for that backend; cpu and triton add their multi-tile tests, where tile merges happen.
SELECTIONS = {
    "reference": ["tests/test_against_oracle.py", "tests/test_rdrop.py", "-k", "reference"],
    # _api.py and nn.py are shared by every backend: the reference backend is the fastest way through them; the
    # default coefficients are checked against dropout's moments (the oracle takes them from dropreg).
    "api": ["tests/test_against_oracle.py", "tests/test_rdrop.py", "tests/test_dropout_identity.py", "tests/test_nn.py",
            "-k", "reference or default_coefficients or ignore_index"],
    # "torch" also selects "torch-small-tiles" (3-row blocks, 5-entry chunks: the online merge).
    "torch": ["tests/test_against_oracle.py", "tests/test_rdrop.py", "tests/test_api.py", "tests/test_sites.py",
              "-k", "torch"],
    "cpu": ["tests/test_against_oracle.py", "tests/test_rdrop.py", "tests/test_api.py", "tests/test_sites.py",
            "tests/test_cpu_backend.py::test_multi_tile_matches_reference",
            "tests/test_cpu_backend.py::test_rdrop_multi_tile_matches_reference", "-k", "cpu"],
    # The interpreter is slow: no gradcheck or low-precision cases; the many-tile tests cover the online
    # rescale (the oracle shapes fit in one 32-wide vocabulary tile).
    "triton": ["tests/test_against_oracle.py", "tests/test_rdrop.py",
               "tests/test_triton_backend.py::test_many_tiles_match_reference",
               "tests/test_triton_backend.py::test_rdrop_many_tiles_match_reference",
               "-k", "triton and not chunked and not gradcheck and not low_precision"],
    # The chunked driver: both epilogue families ("chunked", "chunked-triton"), CE only, bf16 (where the top
    # probability is kept out of the operand) and tests/test_chunked.py.
    "chunked": ["tests/test_against_oracle.py", "tests/test_rdrop.py", "tests/test_ce_only.py",
                "tests/test_low_precision.py", "tests/test_chunked.py", "-k", "chunked and not gradcheck"],
}
SELECTIONS["sites"] = ["tests/test_sites.py", "-k", "reference or unbiased or follow_the_softmax or stream"]
SELECTIONS["ce"] = ["tests/test_ce_only.py", "tests/test_loss_options.py", "-k", "not triton"]
SELECTIONS["options"] = ["tests/test_loss_options.py", "tests/test_ce_only.py", "-k", "z_loss or softcap"]
BACKENDS = tuple(SELECTIONS)
PYTEST_OPTIONS = ["-x", "-q", "-p", "no:cacheprovider"]
TIMEOUT_S = 1200

# Loaded first by every Python process run in a copy (it is on PYTHONPATH): an editable install of dropreg
# points at another checkout, whose package or prebuilt _C would otherwise shadow the mutated sources.
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""

# Run in the copy before pytest: the mutant must import (and, for cpu, build) from the copy itself.
IMPORT_CHECK = """import os, sys
root = os.path.realpath(sys.argv[1])
import dropreg, dropreg.streamed, dropreg.reference
if sys.argv[2] == "cpu":
    import dropreg.cpu
    dropreg.cpu.load()
    assert "dropreg._C" not in sys.modules, "a prebuilt dropreg._C was imported instead of the JIT build"
if sys.argv[2] == "triton":
    import dropreg.triton.ops
if sys.argv[2] == "chunked":
    import dropreg.chunked, dropreg.triton.epilogues
outside = [m.__file__ for name, m in list(sys.modules.items())
           if name.split(".")[0] == "dropreg" and getattr(m, "__file__", None)
           and not os.path.realpath(m.__file__).startswith(root + os.sep)]
assert not outside, f"dropreg modules imported from outside the copy: {outside}"
"""

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Outcome:
    verdict: str  # KILLED, SURVIVED, ERROR, PASSED (baseline), FAILED (baseline)
    first_failure: str
    detail: str
    passed: int
    failed: int
    seconds: float


def locate(text: str, mutant: Mutant) -> tuple[int, str]:
    """``(offset, problem)``: where the mutant's snippet is in ``text`` (-1 and why when it cannot be located)."""
    start = 0
    if mutant.anchor is not None:
        anchors = text.count(mutant.anchor)
        if anchors != 1:
            return -1, f"anchor {mutant.anchor!r} occurs {anchors} times (expected exactly once)"
        start = text.index(mutant.anchor)
    elif text.count(mutant.original) != 1:
        return -1, f"snippet {mutant.original!r} occurs {text.count(mutant.original)} times (expected exactly once)"
    offset = text.find(mutant.original, start)
    return offset, "" if offset >= 0 else f"snippet {mutant.original!r} does not occur after the anchor"


def count_occurrences(root: str, mutant: Mutant) -> int:
    """1 when the mutant can be located in its file, else 0."""
    with open(os.path.join(root, mutant.file), encoding="utf-8") as f:
        return int(locate(f.read(), mutant)[0] >= 0)


def apply_mutant(root: str, mutant: Mutant) -> None:
    path = os.path.join(root, mutant.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    offset, problem = locate(text, mutant)
    if offset < 0:
        raise SystemExit(f"mutant {mutant.id}: {problem} in {mutant.file}: update the mutant list in "
                         f"tools/mutation_test.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:offset] + mutant.replacement + text[offset + len(mutant.original):])


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(REPO, p))]


def make_copy(workdir: str) -> str:
    root = os.path.join(workdir, "repo")
    for rel in tracked_files():
        dst = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), dst)
    isolate = os.path.join(workdir, "isolate")
    os.makedirs(isolate)
    with open(os.path.join(isolate, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    return root


def environment(workdir: str, root: str) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([os.path.join(workdir, "isolate"), root]),
               TORCH_EXTENSIONS_DIR=os.path.join(workdir, "torch_extensions"),
               TRITON_CACHE_DIR=os.path.join(workdir, "triton_cache"),
               TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1",
               COLUMNS="400")  # wide enough that pytest's summary keeps each failure's message
    env.pop("DROPREG_TEST_SEED", None)
    return env


def _summary_count(output: str, word: str) -> int:
    # The last summary line, e.g. "1 failed, 12 passed, 300 deselected in 9.1s".
    lines = [ln for ln in output.splitlines() if re.search(r"\b(passed|failed|error|errors|deselected)\b", ln)
             and " in " in ln]
    match = re.search(rf"(\d+) {word}\b", lines[-1]) if lines else None
    return int(match.group(1)) if match else 0


def run_one(backend: str, mutant: Optional[Mutant], keep: bool = False) -> Outcome:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"dropreg-mutant-{mutant.id if mutant else 'baseline-' + backend}-")
    try:
        root = make_copy(workdir)
        if mutant is not None:
            apply_mutant(root, mutant)
        env = environment(workdir, root)
        check = subprocess.run([sys.executable, "-c", IMPORT_CHECK, root, backend], cwd=root, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
        if check.returncode != 0:
            tail = (check.stderr or check.stdout).strip().splitlines()[-1:]
            return Outcome("ERROR", "", "import/build failed: " + " ".join(tail), 0, 0, time.monotonic() - start)
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_OPTIONS, *SELECTIONS[backend]], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return Outcome("ERROR", "", f"pytest timed out after {TIMEOUT_S}s", 0, 0, time.monotonic() - start)
        output = proc.stdout + proc.stderr
        passed, failed = _summary_count(output, "passed"), _summary_count(output, "failed")
        errors = _summary_count(output, "errors") + _summary_count(output, "error")
        failures = re.findall(r"^FAILED (\S+)", output, flags=re.M)
        seconds = time.monotonic() - start
        if passed + failed == 0:
            return Outcome("ERROR", "", f"no tests ran (pytest exit {proc.returncode})", 0, 0, seconds)
        if proc.returncode == 0:
            return Outcome("SURVIVED" if mutant else "PASSED", "", "", passed, failed, seconds)
        if proc.returncode == 1 and failures and not errors:
            message = re.search(r"^FAILED \S+ - (.*)$", output, flags=re.M)
            return Outcome("KILLED" if mutant else "FAILED", failures[0],
                           message.group(1)[:160] if message else "", passed, failed, seconds)
        return Outcome("ERROR", failures[0] if failures else "",
                       f"pytest exit {proc.returncode}, {errors} errors", passed, failed, seconds)
    finally:
        if keep:
            print(f"  kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def source_state() -> str:
    """The commit the copies are made from, read when the run starts (HEAD may move during a long run)."""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD") + (" (with uncommitted changes to tracked files)" if dirty else "")


def markdown(baselines: dict, results: list, command: str, started: str, commit: str) -> str:
    lines = [
        "# Mutation test results",
        "",
        f"- Date: started {started}, finished {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Commit: {commit}",
        f"- Command: `{command}`",
        f"- Python {sys.version.split()[0]}; each mutant in a fresh copy of the tracked files, run sequentially.",
        "",
        "Each mutant changes one snippet; the backend's pytest selection (below) must fail. "
        "KILLED = a test failed, SURVIVED = all selected tests passed, ERROR = not a valid mutant.",
        "",
        "## Selections (unmutated baseline)",
        "",
        "| backend | pytest arguments | baseline | tests | seconds |",
        "|---|---|---|---|---|",
    ]
    for backend, out in baselines.items():
        args = " ".join(PYTEST_OPTIONS + [repr(a) if " " in a else a for a in SELECTIONS[backend]])
        lines.append(f"| {backend} | `{args}` | {out.verdict} | {out.passed + out.failed} | {out.seconds:.0f} |")
    killed = sum(r.verdict == "KILLED" for _, r in results)
    lines += ["", f"## Mutants: {killed} of {len(results)} killed", "",
              "| id | backend | file | mutation | result | first failing test | seconds |",
              "|---|---|---|---|---|---|---|"]
    for m, r in results:
        failing = f"`{r.first_failure}`" if r.first_failure else ""
        failing += f" ({r.detail})" if r.detail and failing else r.detail
        failing = failing.replace("|", "\\|")
        lines.append(f"| {m.id} | {m.backend} | {m.file} | {m.description} | {r.verdict} | {failing} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, help="run only this backend's mutants")
    parser.add_argument("--only", action="append", metavar="ID", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--out", help="write a markdown table of the results here")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (for debugging)")
    args = parser.parse_args(argv)

    selected = [m for m in MUTANTS if (not args.backend or m.backend == args.backend)
                and (not args.only or m.id in args.only)]
    if args.only and len(selected) != len(set(args.only)):
        known = {m.id for m in MUTANTS}
        parser.error(f"unknown mutant id(s): {sorted(set(args.only) - known)}")
    if args.list:
        for m in selected:
            print(f"{m.id:24} {m.backend:9} {m.file:30} {m.description}")
        return 0
    for m in selected:  # refuse before spending any time if the list is out of date
        if count_occurrences(REPO, m) != 1:
            raise SystemExit(f"mutant {m.id}: snippet {m.original!r} occurs {count_occurrences(REPO, m)} times "
                             f"in {m.file} (expected exactly once): update tools/mutation_test.py")

    command = "python tools/mutation_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, commit = datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), source_state()
    baselines = {}
    if not args.no_baseline:
        for backend in dict.fromkeys(m.backend for m in selected):
            print(f"baseline {backend} ...", flush=True)
            out = run_one(backend, None, args.keep)
            baselines[backend] = out
            print(f"baseline {backend}: {out.verdict} ({out.passed} passed) in {out.seconds:.0f}s "
                  f"{out.first_failure} {out.detail}", flush=True)
            if out.verdict != "PASSED":
                print(f"baseline for {backend} does not pass: mutants would prove nothing", file=sys.stderr)
                return 2

    results = []
    for i, m in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {m.id} ({m.backend}: {m.description}) ...", flush=True)
        out = run_one(m.backend, m, args.keep)
        results.append((m, out))
        print(f"[{i}/{len(selected)}] {m.id}: {out.verdict} in {out.seconds:.0f}s {out.first_failure} "
              f"{out.detail}", flush=True)
        if args.out:  # written after every mutant, so a long run that is cut off still leaves its results
            with open(args.out, "w") as f:
                f.write(markdown(baselines, results, command, started, commit))

    report = markdown(baselines, results, command, started, commit)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    print(report)
    return 0 if all(r.verdict == "KILLED" for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
