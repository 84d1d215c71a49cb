#!/usr/bin/env bash
# One call on the GPU machine for the fused linear cross-entropy (issue 14): build, standalone
# kernel test, the CUDA pytest cases, the benchmark. Budget: <= 8 minutes in all.
#
#   bench/run_lce_device.sh [standalone] [sanitizer] [pytest] [cetests] [bench]
#        (default: standalone pytest bench; sanitizer = compute-sanitizer memcheck + racecheck of
#         the quick standalone set; cetests = the CE reference suite on CUDA)
#
# standalone: csrc/cuda/standalone_test.cu --quick for both row-kernel variants (includes the
#             fp32-logits -> bf16/fp16-gradient, logit-scale and per-row-factor cases the linear
#             cross-entropy uses), ptxas register/spill report of cross_entropy.cu;
# pytest:     builds sftctl._C with CUDA, then the CUDA cases of tests/test_linear_ce.py
#             (device fixture + large bf16 shape vs fp64, graph capture, peak memory) and
#             tests/test_cuda_ops.py (the CE kernels this change touched);
# cetests:    tests/test_ops.py -k cuda (the CE reference suite on CUDA, ~2 min);
# bench:      bench/bench_cuda_lce.py (liger-kernel and cut-cross-entropy wheels from .whl/lce/,
#             carried: `pip download liger-kernel==0.8.5 cut-cross-entropy==25.1.1 --no-deps
#             -d .whl/lce`; each variant is reported as skipped when its package is absent).
# Logs and results go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps="${*:-standalone pytest bench}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version \
  --format=csv | tee "$OUT/gpu.txt"

build_pid=
if [[ $steps == *pytest* || $steps == *bench* || $steps == *cetests* ]]; then
  # --use-pep517: see bench/run_cuda_device.sh; SFTCTL_CE_TUNING=1 for the kernel-plan tests
  (export MAX_JOBS=14 SFTCTL_CE_TUNING=1
   python3 -m pip install --no-build-isolation --no-deps --use-pep517 -e . > "$OUT/build.log" 2>&1
   echo "build rc=$?" >> "$OUT/build.log") &
  build_pid=$!
fi
wheels=$(ls .whl/lce/*.whl 2>/dev/null)  # liger-kernel, cut-cross-entropy (carry .whl/lce)
if [[ -n $wheels ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_lce $wheels && export PYTHONPATH=/tmp/site_lce
fi

if [[ $steps == *standalone* ]]; then
  B=/tmp/standalone_lce
  mkdir -p $B
  F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc -DSFTCTL_CE_TUNING"
  nvcc $F -Xptxas -v -c csrc/cuda/cross_entropy.cu -o $B/ce.o > "$OUT/ptxas.log" 2>&1 & p1=$!
  nvcc $F -c csrc/cuda/sft_labels.cu -o $B/sl.o & p2=$!
  nvcc $F -c csrc/cuda/standalone_test.cu -o $B/st.o & p3=$!
  wait $p1 $p2 $p3 && nvcc -gencode=arch=compute_90a,code=sm_90a $B/*.o -o $B/st || exit 1
  grep -c "0 bytes spill stores, 0 bytes spill loads" "$OUT/ptxas.log" | sed 's/^/ptxas functions without spills: /'
  grep "spill" "$OUT/ptxas.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head
  for k in cluster global; do
    timeout 120 $B/st --quick --kernel $k 2>&1 | tee -a "$OUT/standalone.log" | grep -v '^  ' \
      | grep -E "FAIL|checks|kernel|device" | head -40
  done
  stamp "standalone done"
  if [[ $steps == *sanitizer* ]]; then  # optional: a few minutes
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool, cluster kernel" | tee -a "$OUT/sanitizer.log"
      timeout 200 compute-sanitizer --tool $tool $B/st --quick --kernel cluster 2>&1 | tail -3 \
        | tee -a "$OUT/sanitizer.log"
    done
    stamp "sanitizer done"
  fi
fi

if [[ -n $build_pid ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || { tail -40 "$OUT/build.log"; exit 1; }
  stamp "build done"
fi
if [[ $steps == *pytest* ]]; then
  timeout 240 python3 -m pytest -v -p no:cacheprovider -rfEs tests/test_linear_ce.py -k cuda \
    2>&1 | tee "$OUT/pytest_lce.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Error"
  stamp "pytest linear_ce done"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda_ops.py 2>&1 \
    | tee "$OUT/pytest_cuda_ops.log" | grep -E "^FAILED|^ERROR|passed|failed"
  stamp "pytest cuda_ops done"
fi
if [[ $steps == *cetests* ]]; then
  timeout 200 python3 -m pytest -q -n 8 --max-worker-restart 1000 -p no:cacheprovider \
    tests/test_ops.py -k cuda 2>&1 | tee "$OUT/pytest_ops_cuda.log" | grep -E "^FAILED|passed|failed"
  stamp "pytest test_ops -k cuda done"
fi
if [[ $steps == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-270} python3 bench/bench_cuda_lce.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_lce.log" | grep -v '^|'
  stamp "bench done"
fi
