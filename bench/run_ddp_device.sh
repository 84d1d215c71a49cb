#!/usr/bin/env bash
# One call on a 2-GPU machine: build sftctl against that machine's torch, then the NCCL equality
# test and the 1 -> 2 GPU scaling run (bench/bench_ddp_scaling.py), and/or the GPU cases of the
# trainer/CLI/reliability tests.
#
#   bench/run_ddp_device.sh [ddp] [gputests]      (default: both)
#
# Needs in .whl/ (carried; the GPU image lacks them): datasets, dill, multiprocess wheels for
# cp312; .whl/extra/pyarrow-*.whl is installed only when the machine's pyarrow is older than
# datasets needs (>= 24). Logs and results go to $OUT (7 files: the device tool brings back 8).
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the machine's rule; children inherit these)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps="${*:-ddp gputests}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"
nvidia-smi topo -m 2>&1 | tee -a "$OUT/env.txt"

if ! python3 -c "import sftctl._C" 2>/dev/null; then
  (export MAX_JOBS=14
   python3 -m pip install --no-build-isolation --no-deps --use-pep517 -e . > "$OUT/build.log" 2>&1
   echo "build rc=$?" >> "$OUT/build.log") &
  build_pid=$!
fi
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/extra/pyarrow-*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site
fi
if [[ -n ${build_pid:-} ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || { tail -40 "$OUT/build.log"; exit 1; }
fi
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|datasets|pyarrow|fsspec|accelerate) " \
  | tee -a "$OUT/env.txt"
python3 -m sftctl doctor 2>&1 | tee -a "$OUT/env.txt" | tail -8

if [[ $steps == *ddp* ]]; then
  timeout ${DDP_TIMEOUT:-420} python3 bench/bench_ddp_scaling.py --out "$OUT" ${DDP_ARGS:-} 2>&1 \
    | tee -a "$OUT/ddp.log" | grep -vE "^\s*$|it/s\]"
  tail -n 60 /tmp/sftctl_ddp_scaling/*.log >> "$OUT/runs.log" 2>/dev/null  # the runs' own logs
fi
if [[ $steps == *gputests* ]]; then
  timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_cli.py tests/test_reliability.py tests/test_trainer.py tests/test_cuda_ops.py \
    -k "cuda or fallback or kernels" 2>&1 | tee "$OUT/gputests.log" | tail -25
fi
