"""Vocabulary-parallel heads on CPU: time, peak memory and bytes per rank against the world size.

    python3 benchmarks/distributed.py --worlds 1 2 4 --out docs/benchmarks/distributed

Each world size spawns its ranks (gloo, one thread per rank), splits a V x d head into near-equal slices and times
``linear_cross_entropy`` with both terms (fp32): forward, backward, peak resident memory added by one step, and the
payload bytes each rank hands to the collectives per phase (counted by dropreg.distributed.count_communication),
next to docs/math.md 12.3's formula. ``world 1*`` is the single-process function (no process_group) for reference.
``--backends torch cpu`` repeats the grid with the C++ kernels doing each slice's work.
On a machine with fewer cores than ranks the ranks share cores, so time per rank shows the oversubscription.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dropreg  # noqa: E402
import dropreg.distributed  # noqa: E402


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loopback_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    return 0


def _wire_bytes(hidden, weight, target, group, rank, world, backend):
    """Bytes all ranks put on the loopback interface during one forward and one backward, per rank. Read by rank 0
    between barriers; counts every loopback packet of the machine (headers included), so other traffic adds to it."""
    marks = []

    def mark():
        dist.barrier()
        if rank == 0:
            marks.append(_loopback_tx_bytes())
        dist.barrier()

    hidden.grad = weight.grad = None
    mark()
    out = dropreg.linear_cross_entropy(hidden, weight, target, p=0.1, seed=5, backend=backend, process_group=group)
    mark()
    out.loss.backward()
    mark()
    if rank != 0:
        return None
    return {"forward": (marks[1] - marks[0]) / world, "backward": (marks[2] - marks[1]) / world}


def formula_bytes(rows: int, dim: int, elem: int = 4) -> dict:
    """docs/math.md 12.3, linear_cross_entropy with both terms."""
    return {"forward": rows * (2 * dim + 4) * elem, "backward": rows * dim * elem, "handshake": 15 * 8}


def projection(world=8, rows=8192, dim=8192, vocab=256000, bus_gb_s=400.0, tflops=600.0, elem=4) -> dict:
    """The on-paper estimate for one step with both terms: payload per rank (docs/math.md 12.3), bytes on the wire of
    a ring all-reduce (2 (R-1)/R of the payload), its time at ``bus_gb_s`` per GPU, and the time of the rank's share
    of the 10 NVd multiply-adds at ``tflops`` (2 flops each)."""
    payload = rows * (2 * dim + 4) * elem + rows * dim * elem
    wire = 2 * (world - 1) / world * payload
    return {"payload_bytes": payload, "wire_bytes": wire, "communication_ms": wire / (bus_gb_s * 1e9) * 1e3,
            "compute_ms": 2 * 10 * rows * dim * vocab / world / (tflops * 1e12) * 1e3,
            "logits_allgather_bytes": (world - 1) * rows * (vocab // world) * elem}


def projection_text() -> str:
    plan = projection()
    return ("Projection on paper (`projection()`): 8 GPUs, N=8192, d=8192, V=256000, fp32 statistics, NCCL ring "
            "all-reduce at 400 GB/s bus bandwidth per GPU, compute at 600 TFLOP/s: "
            f"{plan['payload_bytes'] / 1e6:.0f} MB payload and {plan['wire_bytes'] / 1e9:.2f} GB on the wire per rank "
            f"and step, {plan['communication_ms']:.1f} ms of communication against {plan['compute_ms']:.0f} ms of "
            f"compute; all-gathering the logits would bring each rank {plan['logits_allgather_bytes'] / 1e9:.1f} GB.")


def _step(hidden, weight, target, group, backend):
    hidden.grad = weight.grad = None
    t0 = time.perf_counter()
    out = dropreg.linear_cross_entropy(hidden, weight, target, p=0.1, seed=5, backend=backend, process_group=group)
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def rank_main(rank, world, init_file, out_dir, rows, dim, vocab, repeats, sharded, backend):
    torch.set_num_threads(1)
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD if sharded else None
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=gen).requires_grad_()
    weight_full = torch.randn(vocab, dim, generator=gen) / dim**0.5
    target = torch.randint(0, vocab, (rows,), generator=gen)
    weight = torch.tensor_split(weight_full, world)[rank].clone().requires_grad_()
    del weight_full
    _step(hidden, weight, target, group, backend)  # warm-up
    forward, backward = [], []
    for _ in range(repeats):
        if sharded:
            dist.barrier()
        f, b = _step(hidden, weight, target, group, backend)
        forward.append(f)
        backward.append(b)
    rss_before = _rss_kib("VmRSS")
    peak_ok = _reset_peak_rss()
    with dropreg.distributed.count_communication() as log:
        _step(hidden, weight, target, group, backend)
    peak = _rss_kib("VmHWM") - rss_before if peak_ok else None
    wire = _wire_bytes(hidden, weight, target, group, rank, world, backend) if sharded else None
    result = dict(rank=rank, slice=weight.shape[0], forward_s=min(forward), backward_s=min(backward),
                  step_peak_kib=peak, bytes=log.bytes, calls=log.calls, wire=wire)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world, args, backend, sharded=True):
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("spawn")
        procs = [context.Process(target=rank_main, args=(rank, world, os.path.join(tmp, "init"), tmp, args.rows,
                                                         args.dim, args.vocab, args.repeats, sharded, backend))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(600)
            if proc.exitcode != 0:
                raise RuntimeError(f"world {world}: a rank exited with {proc.exitcode}")
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch"], help="local backends: torch, cpu (C++ kernels)")
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)

    expected = formula_bytes(args.rows, args.dim)
    runs = []
    for backend in args.backends:
        runs += [(backend, "1*", run_world(1, args, backend, sharded=False))]
        runs += [(backend, str(w), run_world(w, args, backend)) for w in args.worlds]
    table = []
    for backend, label, results in runs:
        worst = max(results, key=lambda r: r["forward_s"] + r["backward_s"])
        measured = results[0]["bytes"]
        assert all(r["bytes"] == measured for r in results), "ranks sent different payloads"
        peaks = [r["step_peak_kib"] for r in results if r["step_peak_kib"] is not None]
        table.append(dict(backend=backend, world=label, slice=max(r["slice"] for r in results),
                          forward_s=worst["forward_s"],
                          backward_s=worst["backward_s"], step_peak_mib=max(peaks) / 1024 if peaks else None,
                          bytes=measured, calls=results[0]["calls"], wire=results[0]["wire"]))
    lines = [f"N={args.rows}, d={args.dim}, V={args.vocab}, fp32, both terms, gloo on CPU, one thread per rank, "
             f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), "
             f"torch {torch.__version__}; "
             f"slowest rank, best of {args.repeats}.",
             "",
             "Bytes per rank: the payload handed to the collectives (formula of docs/math.md 12.3 in brackets), and "
             "the loopback bytes all ranks sent during the step divided by the world size (wire; a ring all-reduce "
             "sends 2 (R-1)/R of its payload, in brackets).",
             "",
             "| backend | world | slice V_r | forward s | backward s | step peak RSS MiB | fwd payload (formula) | "
             "bwd payload (formula) | handshake | fwd wire (ring) | bwd wire (ring) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        b = row["bytes"]
        sharded = row["world"] != "1*"
        fwd = f"{b['forward']} ({expected['forward']})" if sharded else "-"
        bwd = f"{b['backward']} ({expected['backward']})" if sharded else "-"
        peak = f"{row['step_peak_mib']:.1f}" if row["step_peak_mib"] is not None else "n/a"
        wire = ["-", "-"]
        if sharded:
            ring = 2 * (int(row["world"]) - 1) / int(row["world"])
            wire = [f"{row['wire'][phase]:.0f} ({ring * b[phase]:.0f})"
                    for phase in ("forward", "backward")]
        lines.append(f"| {row['backend']} | {row['world']} | {row['slice']} | {row['forward_s']:.3f} "
                     f"| {row['backward_s']:.3f} | {peak} "
                     f"| {fwd} | {bwd} | {b['handshake'] if sharded else '-'} | {wire[0]} | {wire[1]} |")
    lines += ["", projection_text()]
    report = "\n".join(lines)
    print(report)
    for row in table:
        if row["world"] == "1*":
            continue
        for phase in ("forward", "backward", "handshake"):
            assert row["bytes"][phase] == expected[phase], (row["world"], phase, row["bytes"][phase], expected[phase])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(args=vars(args), formula=expected, rows=table), f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
