#!/usr/bin/env bash
# One command on a GPU box (CUDA + triton installed in the active Python, repo root as working directory):
#   bash scripts/gpu_kernels.sh            # kernel tests on CUDA (bf16/fp16 section included) + full benchmark
#   QUICK=1 bash scripts/gpu_kernels.sh    # tests + a short benchmark (1K..8K, head dim 64, 10 reps)
# Writes results/bench/bench_<device>.json and .png, results/bench/decode_<device>.json and .png (with
# provenance: device, torch/triton, commit, command, date) and results/bench/kernel_tests_<date>.log. Commit those
# files afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
unset TRITON_INTERPRET  # native kernels, not the interpreter
export PYTHONHASHSEED=0

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_kernels.sh: torch.cuda.is_available() is False; this script needs a CUDA GPU")
import triton
print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
PYEOF

mkdir -p results/bench
log="results/bench/kernel_tests_$(date -u +%Y%m%dT%H%M%SZ).log"
# the same tests as on the CPU, natively on CUDA, plus the GPU section (bf16/fp16 at 1K..4K, 1e-2 tolerance)
"$PY" -m pytest -q -p no:randomly tests/test_kernels.py tests/test_bench.py tests/test_decode.py tests/test_gqa_padding.py \
  2>&1 | tee "$log"

if [ "${QUICK:-0}" = "1" ]; then
  "$PY" -m freeatten_core bench --lengths 1024,2048,4096,8192 --mem-lengths 65536 --head-dims 64 --reps 10 "$@"
else
  "$PY" -m freeatten_core bench "$@"   # defaults: bf16, causal, B=4, H=16, D=64,128, L=1K..16K, 32K/64K memory
fi
# one decoding step against KV caches of 1K..64K (grouped queries: 32 query heads, 8 key/value heads, D = 128)
"$PY" -m freeatten_core bench --decode
echo "done: results/bench/*.json, *.png and $log"
