"""The benchmark harness runs end to end (its --quick mode), so it cannot rot."""
import csv
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/math.md's multiply-add counts in units of N x d x V: dropreg forward 3, forward+backward 10; R-Drop 2 and 8;
# cross entropy alone 1 and 3 (written out here, not imported, so a wrong table in methods.py fails).
FLOOR_MULTIPLES = {"dropreg": {"forward": 3, "forward_backward": 10}, "rdrop": {"forward": 2, "forward_backward": 8},
                   "ce": {"forward": 1, "forward_backward": 3}}
CE_ONLY = ("F.linear_cross_entropy", "F.linear_cross_entropy-chunked", "ce-naive", "cce-torch_compile", "cce-cce",
           "liger")
# A committed time may sit below its compute-bound limit by this much and no more: the spread of the square matmul
# that sets the rate, between runs on the 2-core machine (the faster of two is taken; they differed by up to ~10%).
FLOOR_NOISE = 0.10


def _family(method, family):
    return "ce" if method in CE_ONLY or method.startswith("ce-") else family


def assert_floor_ratios_recomputed(rows, family):
    """Every row's floor equals its own family's multiply-adds at the run's square-matmul rate, that rate is the
    fastest square matmul in the file, and floor_ratio is its seconds over the floor."""
    gemm = [r for r in rows if r["method"] == "square-gemm"]
    assert len(gemm) == 2, "a run times the square matmul before and after its cases"
    rate = max(2.0 * int(r["rows"]) ** 3 / float(r["seconds"]) for r in gemm if r["status"] == "ok")
    checked = 0
    for r in rows:
        if r["method"] == "square-gemm" or r["status"] != "ok":
            continue
        multiple = FLOOR_MULTIPLES[_family(r["method"], family)][r["mode"]]
        floor = multiple * 2.0 * int(r["rows"]) * int(r["dim"]) * int(r["vocab"]) / rate
        assert float(r["floor_gflops"]) == pytest.approx(rate / 1e9, rel=1e-6), r
        assert float(r["floor_seconds"]) == pytest.approx(floor, rel=1e-6), r
        assert float(r["floor_ratio"]) == pytest.approx(float(r["seconds"]) / floor, rel=1e-6), r
        checked += 1
    assert checked > 0
    return rate


def committed_results():
    for folder in sorted(os.listdir(os.path.join(ROOT, "docs", "benchmarks"))):
        path = os.path.join(ROOT, "docs", "benchmarks", folder, "results.csv")
        if os.path.exists(path):
            with open(path) as f:
                rows = list(csv.DictReader(f))
            if rows and "floor_ratio" in rows[0]:
                yield folder, rows


def test_committed_results_never_beat_their_floor():
    """docs/benchmarks: every committed vocab_scaling result lies at or above its compute-bound limit, up to the
    square matmul's timing noise, and its floors are recomputed from the file's own rate."""
    folders = []
    for folder, rows in committed_results():
        family = "ce" if all(_family(r["method"], "x") == "ce" for r in rows if r["method"] != "square-gemm") \
            else "rdrop" if any(r["method"].startswith("rdrop-") for r in rows) else "dropreg"
        assert_floor_ratios_recomputed(rows, family)
        below = [(r["method"], r["mode"], r["vocab"], r["floor_ratio"]) for r in rows
                 if r.get("floor_ratio") and float(r["floor_ratio"]) < 1 - FLOOR_NOISE]
        assert not below, f"docs/benchmarks/{folder}: faster than the compute-bound limit: {below}"
        folders.append(folder)
    assert {"dropreg", "dropreg_full", "rdrop", "ce_only"} <= set(folders), folders


@pytest.mark.slow
def test_vocab_scaling_quick(tmp_path):
    # one vocabulary size, forward_backward only (each case is a subprocess): test_vocab_scaling_quick_ce runs the
    # forward mode
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vocab_scaling.py"), "--quick",
                           "--vocabs", "4096", "--modes", "forward_backward", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("results.csv", "results.md", "time_vs_vocab.png", "memory_vs_vocab.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert {"dropreg-torch", "naive", "paper", "F.linear_cross_entropy", "square-gemm"} <= methods
    for r in rows:
        assert r["status"] == "ok", r
        if r["method"] != "square-gemm":
            assert float(r["peak_mib"]) >= 0, r
    assert_floor_ratios_recomputed(rows, "dropreg")
    assert "V=4096: dropreg-" in done.stdout
    # the summary says where each dropreg method wins and where it loses, against each baseline
    assert re.search(r"^dropreg-torch vs naive: .*(faster|slower|on par) at V=", done.stdout, re.M)


@pytest.mark.slow
def test_vocab_scaling_quick_rdrop(tmp_path):
    # forward_backward only: the forward-only mode runs the same script code, covered by test_vocab_scaling_quick_ce
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vocab_scaling.py"), "--quick",
                           "--family", "rdrop", "--vocabs", "512", "--modes", "forward_backward", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"rdrop-dropreg-torch", "rdrop-naive", "square-gemm"} <= {r["method"] for r in rows}
    assert all(r["status"] == "ok" for r in rows)
    assert_floor_ratios_recomputed(rows, "rdrop")
    assert "(8·N·V·d for the rdrop family's forward+backward" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_vocab_scaling_quick_ce(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vocab_scaling.py"), "--quick",
                           "--family", "ce", "--methods", "ce-dropreg-cpu,ce-dropreg-torch,F.linear_cross_entropy,liger",
                           "--skip-unavailable", "--vocabs", "512", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Liger runs on CUDA only: named and skipped (the GPU script's CE part asks for every peer)
    assert "skipped, unknown or unavailable here: liger" in done.stdout
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"ce-dropreg-cpu", "ce-dropreg-torch", "F.linear_cross_entropy", "square-gemm"} == \
        {r["method"] for r in rows}
    assert all(r["status"] == "ok" for r in rows)
    assert_floor_ratios_recomputed(rows, "ce")
    assert "(3·N·V·d for the ce family's forward+backward" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_profile_writes_a_trace_with_dropreg_phases(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vocab_scaling.py"), "--profile",
                           "--rows", "64", "--dim", "16", "--profile-vocab", "2048", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    traces = list(tmp_path.glob("trace_*.json"))
    assert len(traces) == 1
    text = traces[0].read_text()
    assert "dropreg::forward_stats" in text and "dropreg::backward_tiles" in text


@pytest.mark.slow
def test_interleaved_rounds_and_ratios(tmp_path):
    """benchmarks/interleaved.py: every method timed once per round; the summary's ratios are the medians of the
    per-round ratios in rounds.csv."""
    import statistics

    rounds = 3
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "interleaved.py"), "--family", "ce",
                           "--rows", "32", "--dim", "16", "--vocab", "300", "--rounds", str(rounds), "--threads", "1",
                           "--gemm-size", "64", "--methods", "ce-dropreg-torch,F.linear_cross_entropy",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    times = {}
    for r in rows:
        times.setdefault(r["method"], []).append(float(r["seconds"]))
    assert {m: len(t) for m, t in times.items()} == {"ce-dropreg-torch": rounds, "F.linear_cross_entropy": rounds,
                                                      "square-gemm": rounds}
    assert all(t > 0 for ts in times.values() for t in ts)
    table = (tmp_path / "results.md").read_text()
    ours, theirs, gemm = times["ce-dropreg-torch"], times["F.linear_cross_entropy"], times["square-gemm"]
    to_ours = statistics.median(t / o for t, o in zip(theirs, ours))
    floor = statistics.median(theirs) / (3 * 2.0 * 32 * 16 * 300 / (2.0 * 64**3 / min(gemm)))
    wins = sum(o < t for o, t in zip(ours, theirs))
    line = next(row for row in table.splitlines() if row.startswith("| F.linear_cross_entropy |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:] == [f"{floor:.2f}", f"{to_ours:.3f}", f"{wins}/{rounds}"], line
    assert next(row for row in table.splitlines() if row.startswith("| ce-dropreg-torch |")).split("|")[6].strip() \
        == "1.000"


def test_capped_ce_methods_compute_one_loss():
    """The capped-head methods the benchmarks compare, dropreg's and the materialized one Gemma 2's code runs,
    compute the same loss and gradients."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import methods
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    hidden = (torch.randn(64, 16) * 3).requires_grad_()
    weight = (torch.randn(500, 16) * 3).requires_grad_()  # raw logits ~ +-150: the cap of 30 bites
    target = torch.randint(0, 500, (64,))
    results = []
    for name in ("ce-dropreg-cpu-softcap", "ce-naive-softcap"):
        _, forward_backward = methods.CE_METHODS[name](hidden, weight, target, None)
        loss = forward_backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _gpu_session(tmp_path, budget_s, *parts):
    """benchmarks/gpu_session.sh with its output folder in tmp_path; the lines of its parts.txt and packed files."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_SESSION_BUDGET_S=str(budget_s))
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), *parts], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "gpu_session.tar.gz")], capture_output=True, text=True,
                             check=True).stdout.split()
    return (tmp_path / "gpu" / "parts.txt").read_text().splitlines(), listing


def test_gpu_session_logs_each_part_and_skips_what_the_budget_cannot_hold(tmp_path):
    """The one-call GPU script (docs/gpu.md, "To measure it"): a failing part is logged with its exit status and the next
    runs; parts that would start with under 30 s of the budget left are skipped; the tarball holds the logs."""
    lines, listing = _gpu_session(tmp_path / "runs", 600, "no-such-part", "another-one")
    assert [line.split(",")[0] for line in lines] == ["PART no-such-part: exit 2", "PART another-one: exit 2"]
    assert {"gpu/parts.txt", "gpu/no-such-part.log", "gpu/another-one.log"} <= set(listing)
    lines, listing = _gpu_session(tmp_path / "short", 39, "env", "tests")
    assert [re.fullmatch(r"PART (\w+): skipped, \d+ s of the 39 s budget left", line)[1] for line in lines] == \
        ["env", "tests"], lines
    assert "gpu/parts.txt" in listing and "gpu/env.log" not in listing
