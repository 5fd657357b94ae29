"""Vocabulary-parallel heads (dropreg.distributed) across real processes: gloo on CPU, one thread per rank.
With DROPREG_TEST_DEVICE=cuda (a GPU machine, one GPU) the ranks keep their tensors on that GPU and talk over gloo,
and one test runs a single-rank NCCL group (NCCL refuses two ranks on one device).

Each test spawns its ranks once and runs many cases in them (spawning costs seconds per rank); the ranks'
results come back through files and are asserted here. A run that outlives its timeout is killed and fails.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp

import distributed_workers

ON_CUDA = os.environ.get("DROPREG_TEST_DEVICE") == "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Uneven slices, including a one-row slice; rank 1 never holds a target (distributed_workers.make_problem).
SIZES = {1: [13], 2: [9, 4], 3: [2, 7, 4], 4: [5, 1, 4, 3]}


def run_ranks(tmp_path, world, case, *args, timeout=120.0, process_group_backend="gloo"):
    """Run ``distributed_workers.<case>(rank, world, *args)`` on ``world`` spawned ranks; their results by rank."""
    if ON_CUDA:
        timeout *= 3  # every rank starts CUDA and compiles the Triton epilogues of the chunked backend
    context = mp.get_context("spawn")
    init_file = str(tmp_path / "init")
    procs = [context.Process(target=distributed_workers.entry,
                             args=(rank, world, init_file, str(tmp_path), case, args, process_group_backend))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert not hung, f"ranks {hung} did not finish within {timeout} s"
    results = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            status, value = pickle.load(f)
        assert status == "ok", f"rank {rank} failed: {value}"
        results.append(value)
    return results


def test_sliced_head_matches_one_process(tmp_path):
    """World sizes 1-4 (subgroups of one 4-rank spawn)."""
    _check_worlds(run_ranks(tmp_path, 4, "compare_worlds", SIZES), SIZES)


@pytest.mark.skipif(not ON_CUDA, reason="NCCL needs CUDA tensors (DROPREG_TEST_DEVICE=cuda)")
def test_nccl_single_rank_matches_one_process(tmp_path):
    """Every op through NCCL's collectives, the handshake's all_gather and all_gather_object included; one rank,
    since NCCL refuses two ranks on one GPU."""
    _check_worlds(run_ranks(tmp_path, 1, "compare_worlds", {1: SIZES[1]}, process_group_backend="nccl"),
                  {1: SIZES[1]})


def _check_worlds(by_rank, sizes_by_world):
    for world, sizes in sizes_by_world.items():
        results = [by_rank[rank][world] for rank in range(world)]
        failures = []
        for rank, (errors, _) in enumerate(results):
            failures += [f"world {world} rank {rank} {label}: error {err:.3e} > tolerance {tol:.3e}"
                         for label, (err, tol) in errors.items() if not err <= tol]
        assert not failures, "\n".join(failures)
        # Every rank gets identical outputs, bit for bit.
        first = results[0][1]
        for rank, (_, outputs) in enumerate(results[1:], start=1):
            assert outputs.keys() == first.keys()
            different = [label for label in first if not outputs[label].equal(first[label])]
            assert not different, f"world {world}: rank {rank} differs from rank 0 in {different}"
        labels = results[0][0].keys()
        assert "lce/float32/bias=False/mean/grad_weight" in labels and "sample_targets/float64" in labels
        assert "site_regularizers/grad_head.weight" in labels and "site_regularizers/float32/grad_body.weight" in labels
        assert "rdrop/float64/bias=True/none/grad_bias" in labels
        assert "RDropLoss/loss" in labels and "LinearCrossEntropyLoss/loss" in labels
        assert "lce/float64/chunked/bias=True/none/grad_weight" in labels
        for backend in ("", "/chunked"):  # the loss options on a sliced head
            assert f"options/float64{backend}/weight+smoothing/grad_bias" in labels
            assert f"options/float32{backend}/z_loss+lse/lse" in labels
            assert f"options/float64{backend}/rdrop/z_loss" in labels
            assert f"options/float32{backend}/rdrop/softcap/grad_input2" in labels
            assert f"options/float64{backend}/softcap+weight+z_loss+lse/grad_weight" in labels
            assert f"options/float64{backend}/softcap+weight+smoothing/grad_bias" in labels
            assert f"options/float32{backend}/rdrop/softcap+smoothing/grad_input2" in labels
        if "cpu" in by_rank[0]["local_backends"]:
            assert "options/float64/cpu/all/ce-only/grad_weight" in labels
            assert "options/float64/cpu/softcap/implicit/grad_input" in labels
        assert "rdrop/float32/chunked/bias=True/mean/kl" in labels and "softmax_mean/float64/chunked" in labels
        if "cpu" in by_rank[0]["local_backends"]:  # the C++ kernels doing each slice's work, where built
            assert "lce/float64/cpu/bias=True/none/grad_weight" in labels and "softmax_mean/float32/cpu" in labels


def test_empty_batch_ignored_rows_a_masked_slice_and_no_double_backward(tmp_path):
    for rank, errors in enumerate(run_ranks(tmp_path, 3, "edge_cases")):
        assert "double backward refused/torch" in errors and "masked slice/grad_weight" in errors
        assert "option bytes/weight+smoothing+z_loss" in errors
        assert "option bytes/softcap+smoothing" in errors and "option bytes/softcap+weight+smoothing" in errors
        assert "option bytes/softcap+smoothing/ce-only" in errors
        failures = [f"rank {rank} {label}: error {err:.3e} > {tol:.3e}" for label, (err, tol) in errors.items()
                    if not err <= tol]
        assert not failures, "\n".join(failures)


EXPECTED_ERRORS = {
    "target beyond the slices": "expected global class indices in [0, 9)",
    "negative target": "got -3",
    "mismatched d on the last rank": "refused its arguments",
    "reduction differs on rank 0": "every rank must pass the same options",
    "target differs on rank 1": "every rank must pass the same target",
    "input differs on rank 1": "every rank must pass the same input's values",
    "input dtype differs on rank 1": "every rank must pass the same dtype",
    "unsupported backend on rank 0": "refused its arguments",
    "sampled target beyond the slices": "sampled_targets",
    "explicit signs differ on rank 1": "every rank must pass the same options",
    "a site differs on rank 2": "sites[0]: shape",
    "label_smoothing differs on rank 1": "every rank must pass the same options",
    "class weights on rank 0 only": "every rank must pass the same options",
    "class weights of the full head on rank 2": "refused its arguments",
    "softcap on rank 1 only": "every rank must pass the same options",
}


def test_bad_calls_raise_on_every_rank(tmp_path):
    results = run_ranks(tmp_path, 3, "bad_calls")
    for rank, (outcomes, loss) in enumerate(results):
        assert [label for label, _, _ in outcomes] == list(EXPECTED_ERRORS)
        for label, kind, message in outcomes:
            assert kind is not None, f"rank {rank}: {label}: no error"
            if label == "mismatched d on the last rank" and rank == 2:
                assert "expected last dimension d=6" in message  # the offending rank's own error
            elif label == "unsupported backend on rank 0" and rank == 0:
                assert "got 'reference'" in message
            elif label == "class weights of the full head on rank 2" and rank == 2:
                assert "weight: expected shape (2,), one weight per class of linear_weight" in message
            else:
                assert EXPECTED_ERRORS[label] in message, f"rank {rank}: {label}: {message}"
    assert len({loss for _, loss in results}) == 1  # the group still works after the errors


def test_a_rank_without_process_group_gives_a_timeout_error_not_a_hang(tmp_path):
    results = run_ranks(tmp_path, 2, "missing_process_group", timeout=60.0)
    label, kind, message = results[0]
    assert kind == "RuntimeError" and "got no answer from every rank" in message and "process_group" in message
    # Rank 1 ran the single-process function on its slice: it cannot know that rank 0 expected a collective.


@pytest.mark.cpu_only  # the address-space cap is a CPU-memory proof
def test_sliced_head_allocates_nothing_rows_by_vocabulary(tmp_path):
    """Two ranks, each with 65536 of V=131072 classes and N=4096: a rank's own logits would be 1 GiB. Capped at 512 MiB
    above its size, every rank runs both terms and R-Drop, forward and backward, and the same cap refuses the slice's
    logits (so it bites). The sliced head is one code over every local backend's passes (dropreg/ops.py with a
    SliceReducer); "torch" and "cpu" run here (the C++ passes move the target's terms between slices), the chunked
    passes' own memory is proven in one process (tests/test_memory.py)."""
    by_rank = run_ranks(tmp_path, 2, "sliced_head_under_cap", 4096, 64, 65536, 512, ("torch", "cpu"), timeout=300.0)
    for rank, results in enumerate(by_rank):
        for backend in ("torch", "cpu"):
            ok, detail = results[backend]
            assert ok, f"rank {rank} {backend}: {detail}"
        ok, detail = results["materialized logits"]
        assert not ok and "allocate" in detail, f"rank {rank}: {detail}"


@pytest.mark.cpu_only  # tests/conftest.py: skipped with DROPREG_TEST_DEVICE=cuda
def test_benchmark_bytes_equal_the_formula(tmp_path):
    """benchmarks/distributed.py on a tiny problem: it asserts the counted payloads equal docs/math.md 12.3."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import distributed as benchmark
    benchmark.main(["--worlds", "2", "--rows", "6", "--dim", "4", "--vocab", "40", "--repeats", "1",
                    "--out", str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    plan = benchmark.projection()  # docs/vocab_parallel.md's figures
    assert round(plan["payload_bytes"] / 1e6) == 537 + 268 and round(plan["wire_bytes"] / 1e9, 2) == 1.41
    assert round(plan["communication_ms"], 1) == 3.5 and round(plan["compute_ms"]) == 72
    assert round(plan["logits_allgather_bytes"] / 1e9, 1) == 7.3
    assert "| torch | 2 | 20 |" in report and f"{6 * (2 * 4 + 4) * 4} ({6 * (2 * 4 + 4) * 4})" in report


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cpu_only
def test_torchrun_example_runs_without_warnings(tmp_path):
    """The torchrun example of docs/vocab_parallel.md, launched the way the page says, on two ranks; a Python
    warning in a rank is an error."""
    script = os.path.join(ROOT, "examples", "vocab_parallel.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="error")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches one process" in proc.stdout
