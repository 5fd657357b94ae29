"""Time the Triton backend's kernels under alternative tile configurations (needs a CUDA GPU).

    python benchmarks/triton_tile_sweep.py --rows 8192 --dim 4096 --vocab 128256 \
        --candidates moments=128,128,16,8,2 logit_gradient=128,128,32,8,2

Each candidate replaces one kernel's entry for the input dtype's class in dropreg/triton/utils.py's
GPU_CONFIGS (and SM90_CONFIGS), then forward+backward of ``linear_cross_entropy(backend="triton")`` is timed with CUDA events
(median of --repeats after a warm-up that also compiles; benchmarks/run_case.py's timer). The first row is the current table. A winner
still has to pass ``python -m dropreg.triton.compile_report`` (no spills on sm_80 and sm_90) before it
goes into GPU_CONFIGS.
"""
import argparse

import torch

import dropreg
from dropreg.triton import utils
from run_case import time_runs


def time_step(h, w, y, repeats, device):
    def step():
        h.grad = w.grad = None
        dropreg.linear_cross_entropy(h, w, y, p=0.1, seed=0, backend="triton").loss.backward()

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
    h = torch.randn(args.rows, args.dim, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, device=device, generator=gen) / args.dim**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,), device=device, generator=gen)
    dot_class = {torch.bfloat16: "tensor", torch.float16: "fp16"}.get(
        dtype, "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee")
    a, b = h.detach(), w.detach().T.contiguous()
    floor_ms = 10 * 1e3 * time_runs(lambda: a @ b, 3, device, budget_s=60)[0]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name} N={args.rows} d={args.dim} V={args.vocab} {args.dtype}; "
          f"floor (10 x one matmul) {floor_ms:.1f} ms")
    print("| candidate | fwd+bwd ms | / floor |\n|---|---:|---:|")
    runs = [("current table", None)] + [(c, c) for c in args.candidates]
    for label, candidate in runs:
        saved = [{k: dict(v) for k, v in table.items()} for table in (utils.GPU_CONFIGS, utils.SM90_CONFIGS)]
        try:
            if candidate:
                kernel, numbers = candidate.split("=")
                config = utils.TileConfig(*map(int, numbers.split(",")))
                utils.GPU_CONFIGS[kernel][dot_class] = config
                utils.SM90_CONFIGS.setdefault(kernel, {})[dot_class] = config
            seconds = time_step(h, w, y, args.repeats, device)
            print(f"| {label} | {seconds * 1e3:.1f} | {seconds * 1e3 / floor_ms:.2f} |", flush=True)
        except Exception as error:  # a config that fails to compile or launch is reported, not fatal
            print(f"| {label} | error: {type(error).__name__}: {str(error).splitlines()[0][:120]} | |", flush=True)
        finally:
            for table, copy in zip((utils.GPU_CONFIGS, utils.SM90_CONFIGS), saved):
                table.clear()
                table.update(copy)


if __name__ == "__main__":
    main()
