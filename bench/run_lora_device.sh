#!/usr/bin/env bash
# One call on a 1-GPU machine (H200): build sftctl against that machine's torch, then the LoRA
# benchmark (bench/bench_lora.py: sftctl train --plugin lora vs PEFT + HF vs PEFT + HF + Liger,
# Llama-3.1-8B shape, packed rows of 2048) and/or the CUDA cases of tests/test_lora.py (QLoRA).
#
#   bench/run_lora_device.sh [bench] [qlora]      (default: both)
#
# Device call (nvidia-h200, one GPU; ~5-7 min: build ~2-4 min overlapping the HF runners, then
# sftctl ~2-3 min, then the QLoRA test ~1 min):
#   command: bash bench/run_lora_device.sh
#   carry:   [".whl"]  (59.6 MiB: the wheels below, .whl/extra, .whl/bnb_site), or, to stay
#            further under 64 MiB: .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl
#            .whl/liger_kernel-*.whl .whl/bnb_site (+ .whl/extra only if the image's pyarrow < 24)
#
# Wheels (carried; the GPU image lacks them), each group installed when present:
#   .whl/*.whl          datasets, dill, multiprocess (sftctl's data pipeline), liger-kernel
#   .whl/extra/pyarrow-*.whl   only used when the machine's pyarrow is older than datasets needs
#   .whl/bnb_site/      bitsandbytes 0.50.2 unpacked, only its CUDA 13.0 and CPU libraries kept
#                       (4.5 MB; the wheel is 41 MiB with every CUDA/ROCm build), for the QLoRA
#                       test. Made here by:  mkdir -p .whl/bnb_site && cd .whl/bnb_site &&
#                       unzip -q BITSANDBYTES.whl && rm bitsandbytes/libbitsandbytes_{cuda1[12]*,cuda132,rocm*,xpu*}.so
# The extension builds in the background while the HF runners (which do not use it) run; the
# sftctl runner waits for it. Results go to $OUT: lora_<card>_<date>.json/.md, bench.log, the
# runners' logs (runs.log), qlora.log, build.log, env.txt.
set -o pipefail
OUT=${OUT:-/tmp/sftctl_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the machine's rule; children inherit these)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps="${*:-bench qlora}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"

marker=/tmp/sftctl_build.running
if ! python3 -c "import sftctl._C" 2>/dev/null; then
  touch $marker
  (export MAX_JOBS=${MAX_JOBS:-12}
   python3 -m pip install --no-build-isolation --no-deps --use-pep517 -e . > "$OUT/build.log" 2>&1
   echo "build rc=$?" >> "$OUT/build.log"; rm -f $marker) &
  build_pid=$!
fi
wheels=()
ls .whl/*.whl > /dev/null 2>&1 && wheels+=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || exit 1
  export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
  if ls .whl/extra/pyarrow-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/extra/pyarrow-*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "pyarrow < 24 on this machine and no .whl/extra/pyarrow-*.whl carried: datasets" \
         "(sftctl's data pipeline) will not import" | tee -a "$OUT/env.txt"
  fi
fi
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|datasets|pyarrow|liger.kernel|bitsandbytes|accelerate) " \
  | tee -a "$OUT/env.txt"

if [[ $steps == *bench* ]]; then
  # HF runners first (they do not need the extension); sftctl waits for the build
  timeout ${BENCH_TIMEOUT:-480} python3 bench/bench_lora.py --out "$OUT" --build-marker $marker \
    --budget-s ${BENCH_BUDGET:-450} ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" \
    | grep -vE "^\s*$|it/s\]"
  for f in /tmp/sftctl_lora_bench/*.log; do echo "=== $f"; tail -n 40 "$f"; done \
    > "$OUT/runs.log" 2>/dev/null
fi
if [[ -n ${build_pid:-} ]]; then
  wait $build_pid
  tail -1 "$OUT/build.log"
  grep -q "build rc=0" "$OUT/build.log" || { tail -40 "$OUT/build.log"; exit 1; }
fi
if [[ $steps == *qlora* ]]; then
  # bitsandbytes only here: peft imports it whenever it is installed (not in the benchmark)
  [[ -d .whl/bnb_site/bitsandbytes ]] || echo "no .whl/bnb_site: the QLoRA test will skip"
  PYTHONPATH=$PWD/.whl/bnb_site${PYTHONPATH:+:$PYTHONPATH} timeout ${QLORA_TIMEOUT:-240} \
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_lora.py -k "cuda or bitsandbytes" \
    2>&1 | tee "$OUT/qlora.log" | tail -25
fi
