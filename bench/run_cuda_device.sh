#!/usr/bin/env bash
# One call on the GPU machine: build, check and time the CUDA kernels (see bench/NOTES_cuda.md).
#
#   bench/run_cuda_device.sh [standalone] [pytest] [bench]      (default: all three)
#
# standalone: the torch-free device test (csrc/cuda/standalone_test.cu) for every row-kernel
#             variant, the large shape, compute-sanitizer memcheck + racecheck, the kernel-plan
#             micro-benchmark;
# pytest:     builds sftctl._C with CUDA (pip install --no-build-isolation --no-deps -e .) and runs
#             the CUDA cases of tests/test_ops.py plus tests/test_cuda_ops.py;
# bench:      bench/bench_cuda_ce.py (needs liger-kernel 0.8.5 as a wheel in .whl/, carried).
# Logs and results go to $OUT (the device tool brings that folder back).
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps="${*:-standalone pytest bench}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version \
  --format=csv | tee "$OUT/gpu.txt"

build_pid=
if [[ $steps == *pytest* || $steps == *bench* ]]; then
  # --use-pep517: that machine's setuptools turns a legacy `setup.py develop` into a nested,
  # build-isolated pip call, which fails offline; PEP 660 honours --no-build-isolation.
  # SFTCTL_CE_TUNING=1: the tests and bench/ switch kernel plans through SFTCTL_CE_* knobs.
  (export MAX_JOBS=12 SFTCTL_PTXAS_VERBOSE=1 SFTCTL_CE_TUNING=1
   python3 -m pip install --no-build-isolation --no-deps --use-pep517 -e . > "$OUT/build.log" 2>&1
   echo "build rc=$?" >> "$OUT/build.log") &
  build_pid=$!
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

if [[ $steps == *standalone* ]]; then
  B=/tmp/standalone
  mkdir -p $B
  F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc -DSFTCTL_CE_TUNING"
  nvcc $F -c csrc/cuda/cross_entropy.cu -o $B/ce.o & p1=$!
  nvcc $F -c csrc/cuda/sft_labels.cu -o $B/sl.o & p2=$!
  nvcc $F -c csrc/cuda/standalone_test.cu -o $B/st.o & p3=$!
  wait $p1 $p2 $p3 && nvcc -gencode=arch=compute_90a,code=sm_90a $B/*.o -o $B/st || exit 1
  for k in cluster global; do
    timeout 180 $B/st --kernel $k --large 2>&1 | tee -a "$OUT/standalone.log" | grep -v '^  '
  done
  for k in cluster global; do
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool, $k kernel" | tee -a "$OUT/sanitizer.log"
      timeout 200 compute-sanitizer --tool $tool $B/st --quick --kernel $k 2>&1 | tail -3 \
        | tee -a "$OUT/sanitizer.log"
    done
  done
  timeout 200 $B/st --quick --bench 2>&1 | grep -v FAIL | tee "$OUT/standalone_bench.log" \
    | grep -E "bench|kernel="
fi

if [[ -n $build_pid ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || { tail -40 "$OUT/build.log"; exit 1; }
fi
if [[ -n ${AFTER_BUILD:-} ]]; then  # ad-hoc diagnostics, e.g. a profile of one step
  eval "$AFTER_BUILD" 2>&1 | tee "$OUT/after_build.log"
fi
if [[ $steps == *pytest* ]]; then
  timeout 150 python3 -m pytest -v -p no:cacheprovider tests/test_cuda_ops.py 2>&1 \
    | tee "$OUT/pytest_cuda_ops.log" | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed"
  # CUDA cases of the reference tests; -n 8 (pytest-xdist): a crashing worker is reported as a
  # failure and replaced instead of ending the run
  timeout 200 python3 -m pytest -q -n 8 --max-worker-restart 1000 -p no:cacheprovider \
    tests/test_ops.py -k cuda 2>&1 | tee "$OUT/pytest.log" | grep -E "^FAILED|passed|failed"
fi
if [[ $steps == *bench* ]]; then
  timeout 150 python3 bench/bench_cuda_ce.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep -v '^|'
fi
