"""Measure one (method, shape, mode) in this process and print one JSON line. Run by vocab_scaling.py in
a fresh subprocess per case, so peak memory is clean.

Time: median of ``--repeats`` runs after one warm-up (CUDA: events after synchronize).
Memory: CPU, peak RSS over the measured runs minus the RSS once the inputs exist (the peak is reset
through /proc/self/clear_refs); CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation after setup.
An address-space cap (``--mem-limit-mib`` above the post-setup size) turns runaway allocations into a
recorded "oom" instead of the machine swapping or the OOM killer firing.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch

from methods import METHODS, make_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, repeats, device, budget_s):
    """Median seconds of ``repeats`` calls after one warm-up; fewer repeats when one call exceeds budget_s."""
    start = time.perf_counter()
    fn()
    _sync(device)
    warmup = time.perf_counter() - start
    repeats = 1 if warmup * repeats > budget_s else repeats
    times = []
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times), repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--mode", required=True, choices=["forward", "forward_backward"])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mem-limit-mib", type=int, default=16384)
    parser.add_argument("--time-budget-s", type=float, default=60.0)
    parser.add_argument("--workspace-mib", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workspace_mib:
        import dropreg

        dropreg.set_workspace_bytes(args.workspace_mib << 20, args.device)
    result = dict(method=args.method, mode=args.mode, rows=args.rows, dim=args.dim, vocab=args.vocab,
                  dtype=args.dtype, device=args.device, threads=torch.get_num_threads(),
                  workspace_mib=args.workspace_mib)
    inputs = make_inputs(args.rows, args.dim, args.vocab, DTYPES[args.dtype], args.device)
    forward, forward_backward = METHODS[args.method](*inputs)
    fn = forward if args.mode == "forward" else forward_backward
    if fn is None:
        print(json.dumps(dict(result, status="n/a")))
        return
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        cap = _status_kib("VmSize") * 1024 + args.mem_limit_mib * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        _reset_peak_rss()
    try:
        seconds, repeats = time_runs(fn, args.repeats, args.device, args.time_budget_s)
    except (RuntimeError, MemoryError) as error:
        message = str(error)
        oom = "allocate" in message or "out of memory" in message.lower() or isinstance(error, MemoryError)
        print(json.dumps(dict(result, status="oom" if oom else "error", error=message.splitlines()[0][:300])))
        return
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    print(json.dumps(dict(result, status="ok", seconds=seconds, repeats=repeats, peak_mib=peak / 2**20)))


if __name__ == "__main__":
    sys.exit(main())
