#!/usr/bin/env bash
# The GPU measurements and CUDA checks in one device call (docs/gpu.md, "The GPU backend"). Run from
# the project root on the lent GPU machine, carrying .whl (../shared/tools/gpu_wheels.sh fetches Liger-Kernel and
# Cut Cross-Entropy):
#   bash benchmarks/gpu_session.sh [PART ...]    PARTs, in this order by default:
#     env smoke dropreg profile ce rdrop tests compile triton vocabs sweep scale nccl
#   (distributed, the whole distributed suite on the GPU, only by name)
# A session is lent 15 minutes of device time, the machine's start included: one call of under 10 minutes. So the
# whole script keeps to GPU_SESSION_BUDGET_S seconds (default 540): each PART runs under `timeout` with what is
# left (at most its own cap), and a PART that would start with under 30 s left is skipped and logged. Everything at
# V=128256 comes first: a 30-second smoke test, the headline benchmark (chunked, naive and the floor's matmul), its
# profile, cross entropy alone against the peers installed, R-Drop, the chunked path's GPU tests, a torch.compile
# step; then the one-pass Triton backend and torch.compile(naive), the other vocabulary sizes, the sweeps.
# Everything goes under $OUT/gpu/ and is packed into $OUT/gpu_session.tar.gz after every PART (the device tool
# returns 8 files at most, and what is under $OUT still comes back when the call runs past its limit).
set -uo pipefail
OUT=${OUT:-/tmp/dropreg_gpu}
LOGS=$OUT/gpu
BUDGET_S=${GPU_SESSION_BUDGET_S:-540}
VOCABS=${VOCABS:-128256}
mkdir -p "$LOGS"
export LOGS VOCABS PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no C++ build: the GPU paths need none
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# The seconds a PART may take at most, whatever is left of the budget.
part_cap() {
  case "$1" in
    env) echo 60 ;;
    smoke) echo 60 ;;
    compile) echo 90 ;;
    tests) echo 150 ;;
    nccl) echo 150 ;;
    distributed) echo 500 ;;
    *) echo 600 ;;
  esac
}

part_command() {  # runs in a child bash under timeout: it sees exported variables and functions only
  # --timeout-s: one slow case is recorded as a time-out instead of eating the call.
  local SHAPE=(--device cuda --dtype bfloat16 --rows 8192 --dim 4096 --repeats 5 --modes forward_backward --timeout-s 120 --gemm-size 8192)
  # the chunked path's cases (its fp64 oracle cases compile the epilogues in fp64) and the GPU-only checks of auto
  local GPU_TESTS=(tests/test_chunked.py tests/test_against_oracle.py tests/test_low_precision.py tests/test_rdrop.py
                   tests/test_sites.py "tests/test_triton_gpu.py::test_auto_runs_the_chunked_path_on_cuda_tensors"
                   "tests/test_triton_gpu.py::test_every_site_ops_on_the_gpu_path")
  case "$1" in
    env) nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; git log --oneline -1 ;;
    # pytest-xdist is in the device image: 4 workers compile the Triton kernels in parallel (tested on CPU).
    tests) DROPREG_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider $(python3 -c "import xdist" 2>/dev/null \
             && echo "-n 4") "${GPU_TESTS[@]}" -k "chunked or gpu" ;;
    smoke) python3 benchmarks/gpu_smoke.py ;;
    compile) python3 benchmarks/gpu_smoke.py --compile ;;
    dropreg) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs "$VOCABS" --family dropreg \
               --methods dropreg-chunked,naive --out "$LOGS/dropreg" ;;
    triton) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs "$VOCABS" --family dropreg \
              --methods dropreg-triton,naive-compiled --out "$LOGS/triton" ;;
    vocabs) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs 32768,256000 --family dropreg \
              --methods dropreg-chunked,naive --out "$LOGS/vocabs" ;;
    ce) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs "$VOCABS" --family ce --skip-unavailable \
          --methods ce-dropreg-chunked,liger,cce-cce,F.linear_cross_entropy,F.linear_cross_entropy-chunked,ce-naive \
          --out "$LOGS/ce" ;;
    rdrop) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs "$VOCABS" --family rdrop \
             --methods rdrop-dropreg-chunked,rdrop-naive --out "$LOGS/rdrop" ;;
    nccl) DROPREG_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py \
            -k "nccl or sliced_head" ;;  # issue 13: a one-rank NCCL group, and ranks on the GPU over gloo
    sweep) for mib in 256 512 1024 2048 4096; do  # the workspace sets the chunk width (docs/math.md 7.3)
             python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs 128256 --family dropreg --methods dropreg-chunked \
               --workspace-mib $mib --out "$LOGS/sweep/workspace_$mib"
           done ;;
    profile) python3 benchmarks/vocab_scaling.py --profile --device cuda --dtype bfloat16 --rows 8192 --dim 4096 \
               --profile-vocab 128256 --out "$LOGS/profile" ;;
    distributed) DROPREG_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py ;;
    scale) python3 benchmarks/max_tokens.py --methods dropreg-chunked,naive,ce-dropreg-chunked,liger \
             --out "$LOGS/max_tokens.csv" ;;
    *) echo "unknown PART $1"; return 2 ;;
  esac
}

export -f part_command

pack() {
  rm -f "$LOGS"/profile/*.json  # Chrome traces: too large to bring back
  tar -czf "$OUT/gpu_session.tar.gz.part" -C "$OUT" gpu && mv "$OUT/gpu_session.tar.gz.part" "$OUT/gpu_session.tar.gz"
}

run_part() {
  local left=$((BUDGET_S - SECONDS - 10))  # 10 s kept for packing
  if [ "$left" -lt 30 ]; then
    echo "PART $1: skipped, $((BUDGET_S - SECONDS)) s of the ${BUDGET_S} s budget left" | tee -a "$LOGS/parts.txt"
    return
  fi
  local cap start=$SECONDS
  cap=$(part_cap "$1")
  [ "$cap" -gt "$left" ] && cap=$left
  timeout --kill-after=5 "$cap" bash -c 'part_command "$1"' part "$1" > "$LOGS/$1.log" 2>&1
  local status=$?
  local note=""
  [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && note=" (stopped at its ${cap} s limit)"
  echo "PART $1: exit $status, $((SECONDS - start)) s$note" | tee -a "$LOGS/parts.txt"
  tail -n 25 "$LOGS/$1.log"
  pack
}

for part in "${@:-env smoke dropreg profile ce rdrop tests compile triton vocabs sweep scale nccl}"; do
  for p in $part; do run_part "$p"; done
done
pack
