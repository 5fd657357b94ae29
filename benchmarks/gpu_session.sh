#!/usr/bin/env bash
# Issue 16's GPU measurements in one device call (README, "The GPU backend"). Run from the project root on the lent
# GPU machine, carrying .whl (../shared/tools/gpu_wheels.sh fetches Liger-Kernel and Cut Cross-Entropy):
#   bash benchmarks/gpu_session.sh [PART ...]    PARTs, in this order by default:
#     env tests dropreg ce rdrop sweep profile scale distributed
# Everything goes under $OUT/gpu/ and is packed into $OUT/gpu_session.tar.gz (the device tool returns 8 files at
# most). A PART that fails is logged and the next one runs; the budget of one call is 10 minutes, so pass fewer
# PARTs to a call when the machine is slower than expected (each PART prints its seconds).
set -uo pipefail
OUT=${OUT:-/tmp/dropreg_gpu}
LOGS=$OUT/gpu
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no C++ build: the GPU paths need none
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SHAPE=(--device cuda --dtype bfloat16 --rows 8192 --dim 4096 --repeats 5 --modes forward_backward)
VOCABS=32768,128256,256000
run_part() {
  local start=$SECONDS
  case "$1" in
    env) { nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; git log --oneline -1; } ;;
    tests) DROPREG_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_chunked.py \
             tests/test_triton_gpu.py tests/test_against_oracle.py tests/test_low_precision.py tests/test_rdrop.py \
             tests/test_sites.py -k "chunked or gpu" ;;
    dropreg) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs $VOCABS --family dropreg \
               --methods dropreg-chunked,dropreg-triton,naive,naive-compiled --out "$LOGS/dropreg" ;;
    ce) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs $VOCABS --family ce \
          --methods ce-dropreg-chunked,liger,cce-cce,F.linear_cross_entropy,F.linear_cross_entropy-chunked,ce-naive \
          --out "$LOGS/ce" ;;
    rdrop) python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs $VOCABS --family rdrop \
             --methods rdrop-dropreg-chunked,rdrop-naive --out "$LOGS/rdrop" ;;
    sweep) for mib in 256 512 1024 2048 4096; do  # the workspace sets the chunk width (docs/math.md 7.3)
             python3 benchmarks/vocab_scaling.py "${SHAPE[@]}" --vocabs 128256 --family dropreg --methods dropreg-chunked \
               --workspace-mib $mib --out "$LOGS/sweep/workspace_$mib"
           done ;;
    profile) python3 benchmarks/vocab_scaling.py --profile --device cuda --dtype bfloat16 --rows 8192 --dim 4096 \
               --profile-vocab 128256 --out "$LOGS/profile" ;;
    distributed) DROPREG_TEST_DEVICE=cuda timeout 500 python3 -m pytest -q -p no:cacheprovider \
                   tests/test_distributed.py ;;  # issue 13: ranks on the GPU over gloo, and a one-rank NCCL group
    scale) python3 benchmarks/max_tokens.py --methods dropreg-chunked,naive,ce-dropreg-chunked,liger \
             --out "$LOGS/max_tokens.csv" ;;
    *) echo "unknown PART $1"; return 2 ;;
  esac > "$LOGS/$1.log" 2>&1
  local status=$?
  echo "PART $1: exit $status, $((SECONDS - start)) s" | tee -a "$LOGS/parts.txt"
  tail -n 25 "$LOGS/$1.log"
}
for part in "${@:-env tests dropreg ce rdrop sweep profile scale distributed}"; do
  for p in $part; do run_part "$p"; done
done
rm -f "$LOGS"/profile/*.json  # Chrome traces: too large to bring back
tar -czf "$OUT/gpu_session.tar.gz" -C "$OUT" gpu
