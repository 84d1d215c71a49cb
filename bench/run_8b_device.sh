#!/usr/bin/env bash
# One call on the 2-GPU machine (kind nvidia-h200-x2): bench/bench_8b_fsdp.py, an 8B full
# fine-tune with FSDP2 (issue 17): NCCL collective timing (while sftctl builds in the
# background on the upper half of the cores), 2-GPU FSDP2 run with a sharded checkpoint, resume,
# 1-GPU attempt, projection to 8 GPUs.
#
#   bash bench/run_8b_device.sh
#   F8_ARGS="--skip one_gpu" bash bench/run_8b_device.sh
#
# Carry: .whl/e2e (the wheel folder WHL; carry [".whl/e2e"], 58 MB):
# datasets, dill, multiprocess wheels (liger-kernel and trl are installed too, unused here);
# its extra/pyarrow and extra/fsspec are installed only when the machine's own are outside what
# datasets 5.2 needs. Results go to $OUT: fsdp8b_*.json, fsdp8b_*.md, bench.log, runs.log,
# env.txt, build.log.
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# NVLink multicast stays off (the machine's rule; children inherit these)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"
nvidia-smi topo -m 2>&1 | tee -a "$OUT/env.txt"
df -h / /tmp /dev/shm 2>&1 | tee -a "$OUT/env.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/env.txt"
pin_build=""
if command -v taskset > /dev/null && [[ $(nproc) -ge 12 ]]; then
  n=$(nproc); pin_build="taskset -c $((n / 2))-$((n - 1))"
fi
rm -f /tmp/sftctl_build_done
if ! python3 -c "import sftctl._C" 2>/dev/null; then
  (export MAX_JOBS=$(( $(nproc) / 2 ))
   $pin_build python3 -m pip install --no-build-isolation --no-deps --use-pep517 -e . \
     > "$OUT/build.log" 2>&1
   echo "build rc=$? after $((SECONDS - T0)) s" >> "$OUT/build.log"
   touch /tmp/sftctl_build_done) &
  build_pid=$!
else
  touch /tmp/sftctl_build_done
fi
WHL=${WHL:-.whl/e2e}
if ls $WHL/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $WHL/*.whl || exit 1
  if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $WHL/extra/pyarrow-*.whl || exit 1
  fi
  if ! python3 -c "
import fsspec, sys
v = tuple(int(x) for x in fsspec.__version__.split('.')[:3])
sys.exit(v > (2026, 9, 0))"; then  # datasets 5.2 pins fsspec<=2026.9.0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $WHL/extra/fsspec-*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site
fi
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|datasets|pyarrow|fsspec|accelerate) " \
  | tee -a "$OUT/env.txt"
echo "setup done after $((SECONDS - T0)) s" | tee -a "$OUT/env.txt"
budget=$((${F8_BUDGET:-510} - (SECONDS - T0)))
timeout $((budget + 30)) python3 bench/bench_8b_fsdp.py --out "$OUT" --budget-s $budget \
  --build-done /tmp/sftctl_build_done ${F8_ARGS:-} 2>&1 | tee "$OUT/bench.log"
if [[ -n ${build_pid:-} ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || tail -30 "$OUT/build.log"
fi
for f in /tmp/sftctl_8b/*.log; do echo "== $f"; grep -vE "^\[ *[0-9.]+\] *$" "$f" | tail -n 40; done \
  > "$OUT/runs.log" 2>/dev/null
echo "total $((SECONDS - T0)) s"
