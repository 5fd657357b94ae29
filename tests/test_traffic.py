"""tools/traffic.py: the chunked driver's memory traffic outside its GEMMs, counted on meta tensors
(docs/gpu/traffic.md is its output at the LM shape)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("traffic", os.path.join(ROOT, "tools", "traffic.py"))
traffic = importlib.util.module_from_spec(_spec)
sys.modules["traffic"] = traffic  # its dataclasses look their module up
_spec.loader.exec_module(traffic)


def test_aten_calls_are_counted_by_what_they_move():
    count = traffic.Count()
    x = torch.empty(3, 4, device="meta")  # 48 bytes, free
    w = torch.empty(10, 4, dtype=torch.bfloat16, device="meta")
    with traffic.AtenTraffic(count):
        y = x * 2  # reads x, writes y
        x.add_(y)  # reads both, writes x
        x[:, :2].copy_(y[:, :2])  # copy_: reads the source only
        picked = w[torch.zeros(3, dtype=torch.int64, device="meta")]  # a gather reads what it returns (+ index)
        torch.mm(x, y.T)  # a GEMM: multiply-adds, no bytes
        x.mul_(torch.empty(3, 1, device="meta").expand(3, 4))  # an expanded operand counts its 3 elements
    entries = {what: e for (_, what), e in count.entries.items()}
    assert (entries["mul"].read, entries["mul"].written) == (48, 48)
    assert (entries["add_"].read, entries["add_"].written) == (96, 48)
    assert (entries["copy_"].read, entries["copy_"].written) == (24, 24)
    assert (entries["index"].read, entries["index"].written) == (picked.numel() * 2 + 3 * 8, picked.numel() * 2)
    assert entries["mm"].macs == 3 * 4 * 3 and entries["mm"].read == entries["mm"].written == 0
    assert (entries["mul_"].read, entries["mul_"].written) == (48 + 12, 48)
    assert entries["zeros"].written == 3 * 8  # the index, made inside the mode
    assert count.bytes() == 96 + 144 + 48 + (48 + 24) + 24 + 108


def test_epilogue_launches_follow_the_kernels_loops():
    from dropreg.triton.epilogues import TritonEpilogues

    count = traffic.Count()
    rows, cols = 8, 64
    z = torch.empty(rows, cols, device="meta")
    probs = torch.empty(rows, cols, dtype=torch.bfloat16, device="meta")
    state = [torch.empty(rows, device="meta") for _ in range(3)]
    TritonEpilogues(traffic.EpilogueTraffic(count)).softmax_chunk(z, None, *state, probs)
    (entry,) = count.entries.values()
    # z once (no reference moves), no bias; probs written; three states read and written, three outputs
    assert entry.read == rows * cols * 4 + 3 * rows * 4
    assert entry.written == rows * cols * 2 + 3 * rows * 4 + 2 * rows * 4 + rows * 8


def test_row_kernels_count_gathered_rows_and_scattered_rows_once():
    """A gathered weight row is read once per index entry, not the whole weight; the rows scattered into grad_W,
    handed whole to every chunk's launch, are read once over the sweep."""
    rows, dim, vocab = 16, 8, 1000
    count = traffic.Count()
    traffic.run_step(torch.bfloat16, rows, dim, vocab, "terms", count)
    entries = {what: e for (_, what), e in count.entries.items()}
    finish, sweep, grad_w = (entries[k] for k in ("finish_moments_kernel", "sweep_rows_kernel",
                                                   "weight_gradient_kernel"))
    row_d = rows * dim
    # moments [A1 | A2] (fp32) read and written; h, signs and the target's and the dominant class's W rows (bf16)
    assert finish.read == 2 * row_d * 4 + 4 * row_d * 2 + rows * (4 + 4 + 8 + 8 + 2 + 4 + 4)
    # grad_W: the product and W*W's product (fp32) and W read, written once (bf16); the dominant parts (fp32) and
    # the target rows' h and signs (bf16) once over all chunks, with their order, scales and class starts
    assert grad_w.written == vocab * dim * 2
    assert grad_w.read > vocab * dim * (4 + 4 + 2) + row_d * (4 + 2 + 2)
    assert grad_w.read < vocab * dim * (4 + 4 + 2) + row_d * (4 + 2 + 2) + 40 * (rows + vocab)
    assert sweep.written > row_d * (2 + 2 + 2 + 4 + 4)  # [H; T], gR'q, grad_h init, dominant parts


def test_step_with_both_terms_is_within_its_30_gb_target():
    """The issue's target for the counted step (docs/gpu/traffic.md, which test_committed_table_is_the_tools_output
    keeps current): at most 30 GB outside the GEMMs at N=8192, d=4096, V=128256, bf16, both terms."""
    import re

    with open(os.path.join(ROOT, "docs", "gpu", "traffic.md")) as f:
        terms = float(re.findall(r"Outside the GEMMs: \*\*([\d.]+) GB\*\*", f.read())[0])
    assert terms <= 30.0


@pytest.mark.parametrize("op, gemm_nvd", [("terms", 10), ("ce", 3), ("rdrop", 8)])
def test_every_gemm_of_the_step_is_seen(op, gemm_nvd):
    """The floor's multiply-adds (docs/math.md): had a product gone to the elementwise side, they would be short."""
    rows, dim, vocab = 64, 32, 1000
    count = traffic.Count()
    traffic.run_step(torch.bfloat16, rows, dim, vocab, op, count)
    assert count.macs() == gemm_nvd * rows * vocab * dim


def test_committed_table_is_the_tools_output(tmp_path):
    """The tool in its own process without TRITON_INTERPRET, as a user runs it: the epilogues' tiles are the GPU's
    (the interpreter's small ones would change the column-sum buffers)."""
    out = tmp_path / "traffic.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "traffic.py"), "--markdown", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(ROOT, "docs", "gpu", "traffic.md")) as f:
        committed = f.read()
    marker = "<!-- tools/traffic.py output -->\n"
    assert marker in committed
    assert committed.split(marker, 1)[1] == out.read_text(), \
        "docs/gpu/traffic.md is stale: python tools/traffic.py, then paste its output under the marker"


def test_gpu_page_and_readme_quote_the_table():
    """docs/gpu.md's and the README's totals are docs/gpu/traffic.md's, in its order: the step with both terms, CE
    alone, R-Drop."""
    import re

    with open(os.path.join(ROOT, "docs", "gpu", "traffic.md")) as f:
        totals = re.findall(r"Outside the GEMMs: \*\*([\d.]+) GB\*\*; the design's irreducible ([\d.]+) GB", f.read())
    with open(os.path.join(ROOT, "docs", "gpu.md")) as f:
        page = " ".join(f.read().split())
    (terms, terms_floor), (ce, ce_floor), (rdrop, rdrop_floor) = totals
    assert f"read and write {terms} GB" in page and f"against {terms_floor} GB the design cannot avoid" in page
    assert f"cross entropy alone {ce} GB (irreducible {ce_floor})" in page
    assert f"R-Drop {rdrop} GB ({rdrop_floor})" in page
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert f"counted at {terms} GB of memory traffic outside its GEMMs, against {terms_floor} GB" in readme
