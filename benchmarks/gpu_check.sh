#!/usr/bin/env bash
# The GPU check: CUDA tests and GPU benchmarks in one short run, results as JSON under $OUT.
#
#   OUT=results/gpu bash benchmarks/gpu_check.sh
#
# Uses the machine's own torch (no install: the pinned CPU torch is not for this machine), the
# package from src/, and pykeops from wheels in .whl/ when they are there. Each step has its own
# time limit and a failing step does not stop the next one. Budget: about 9 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NTKSCALE_EXT_DIR="${NTKSCALE_EXT_DIR:-/tmp/ntkscale-ext}" NTKSCALE_KEOPS_DIR=/tmp/ntkscale-keops
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; c=torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo 9.0)}"
export MAX_JOBS=16
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step SECONDS NAME CMD...: run with a limit, log to $OUT/log.txt
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date +%T))" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" 2>&1 | grep -v '^\[KeOps\] Generating\|^\[pyKeOps\] Compiling' | tee -a "$OUT/log.txt" | tail -n 40
  echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; nvcc --version | tail -1; } >"$OUT/env.txt" 2>&1
step 170 "CUDA tests" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_operator.py tests/test_kernel_space.py tests/test_cholesky.py -rs
step 40 "matvec vs training step (GPU)" python3 benchmarks/bench_matvec.py --device cuda --repeats 10 --out "$OUT/matvec_gpu.json"
step 100 "crossover, TF32 off" python3 benchmarks/bench_crossover.py --device cuda --tf32 off --repeats 5 --out "$OUT/crossover_gpu_tf32off.json"
step 60 "crossover, TF32 on" python3 benchmarks/bench_crossover.py --device cuda --tf32 on --repeats 5 --impls structured cuda --out "$OUT/crossover_gpu_tf32on.json"
step 150 "NTK-GP, exact (in-memory float64 factor) and fast variances (GPU)" python3 benchmarks/bench_gp.py --device cuda --factor-memory 40 --block-size 400 --out "$OUT/gp_gpu.json"
echo "done $(date +%T)" | tee -a "$OUT/log.txt"
