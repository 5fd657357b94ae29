"""Time the Triton backend's kernels under alternative tile configurations (needs a CUDA GPU).

    python benchmarks/triton_tile_sweep.py --rows 8192 --dim 4096 --vocab 128256 \
        --candidates moments=128,128,16,8,2 logit_gradient=128,128,32,8,2

Each candidate replaces one kernel's tiles in the launch plan that the launchers would choose for this
dtype and device (dropreg/triton/utils.py's ``launch_plan``; the plan is passed in, no table is modified),
then forward+backward of the fused op with both terms (dropreg/triton/ops.py's ``linear_ce_step``, the
launchers the registered ops call) is timed with CUDA events (median of --repeats after a warm-up that also
compiles; benchmarks/run_case.py's timer). The first row is the current plan. A winner still has to pass
``python tools/compile_report.py`` (no spills on sm_80 and sm_90) before it goes into GPU_CONFIGS.
"""
import argparse

import torch

from dropreg.triton import ops, utils
from run_case import time_runs


def time_step(h, w, y, plan, repeats, device):
    upstream = [torch.full((h.shape[0],), 1.0 / h.shape[0], device=device) for _ in range(3)]

    def step():
        ops.linear_ce_step(h, w, None, y, upstream, seed=0, plan=plan)

    return time_runs(step, repeats, device, budget_s=600)[0]  # the warm-up call also compiles


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only under TRITON_INTERPRET=1 (a smoke run)")
    parser.add_argument("--candidates", nargs="*", default=[],
                        help="KERNEL=block_m,block_v,block_k,warps,stages (one kernel per candidate)")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.rows, args.dim, device=device, generator=gen).to(dtype)
    w = (torch.randn(args.vocab, args.dim, device=device, generator=gen) / args.dim**0.5).to(dtype)
    y = torch.randint(0, args.vocab, (args.rows,), device=device, generator=gen)
    current = utils.launch_plan(dtype, torch.device(device))
    a, b = h, w.T.contiguous()
    floor_ms = 10 * 1e3 * time_runs(lambda: a @ b, 3, device, budget_s=60)[0]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name} N={args.rows} d={args.dim} V={args.vocab} {args.dtype}; "
          f"floor (10 x one matmul) {floor_ms:.1f} ms")
    print("| candidate | fwd+bwd ms | / floor |\n|---|---:|---:|")
    runs = [("current table", None)] + [(c, c) for c in args.candidates]
    for label, candidate in runs:
        try:
            plan = current
            if candidate:
                kernel, numbers = candidate.split("=")
                plan = current.with_tiles(**{kernel: utils.TileConfig(*map(int, numbers.split(",")))})
            seconds = time_step(h, w, y, plan, args.repeats, device)
            print(f"| {label} | {seconds * 1e3:.1f} | {seconds * 1e3 / floor_ms:.2f} |", flush=True)
        except Exception as error:  # a config that fails to compile or launch is reported, not fatal
            print(f"| {label} | error: {type(error).__name__}: {str(error).splitlines()[0][:120]} | |", flush=True)


if __name__ == "__main__":
    main()
