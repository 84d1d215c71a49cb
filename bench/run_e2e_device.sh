#!/usr/bin/env bash
# One call on one H200 (kind nvidia-h200): bench/bench_e2e.py, `sftctl train` vs plain HF / Liger /
# TRL on the same tokens (issue 14, part 5). The sftctl extension builds in the background on
# cores 8-15 while the runs that do not need it (HF, Liger) go first on cores 0-7; sftctl runs
# wait for the build.
#
#   bash bench/run_e2e_device.sh                 # workloads a b c, every runner, ~490 s budget
#   E2E_ARGS="--workloads c" bash bench/run_e2e_device.sh
#
# Carry: .whl/e2e (the wheel folder WHL; carry [".whl/e2e"], 58 MB):
# datasets, dill, multiprocess, liger-kernel, trl wheels; its extra/pyarrow and extra/fsspec
# are installed only when the machine's own are outside what datasets 5.2 needs.
# Results go to $OUT: e2e_*.json, e2e_*.md, bench.log, runs.log, env.txt, build.log.
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version \
  --format=csv | tee -a "$OUT/env.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/env.txt"
pin_build="" pin_run=""
if command -v taskset > /dev/null && [[ $(nproc) -ge 12 ]]; then
  n=$(nproc); half=$((n / 2))
  pin_build="taskset -c $half-$((n - 1))" pin_run="taskset -c 0-$((half - 1))"
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
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|datasets|pyarrow|fsspec|accelerate|peft|trl|liger.kernel|triton) " \
  | tee -a "$OUT/env.txt"
echo "setup done after $((SECONDS - T0)) s" | tee -a "$OUT/env.txt"
# the whole call stays under ~9 minutes: the runs get what is left of 510 s
budget=$((510 - (SECONDS - T0)))
$pin_run timeout $((budget + 30)) python3 bench/bench_e2e.py --out "$OUT" --budget-s $budget \
  --build-done /tmp/sftctl_build_done ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
  | grep -vE "^\s*$|it/s\]"
if [[ -n ${build_pid:-} ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || tail -30 "$OUT/build.log"
fi
for f in /tmp/sftctl_e2e/*.log; do echo "== $f"; tail -n 25 "$f"; done > "$OUT/runs.log" 2>/dev/null
echo "total $((SECONDS - T0)) s"
