#!/usr/bin/env bash
# The `gpu` preset end to end on one GPU (H100-class): trains softmax, LSSA, LSSAR (p=15) and SSMax at L=256
# on GPT-2-BPE Shakespeare, evaluates LSSA also with inference-only re-weighting, at 1x..16x (up to 4096
# tokens), and writes
#   results/extrapolation/<variant>.json            losses at k*L (window mean, last-L mean, by position) + provenance
#   results/extrapolation/extrapolation.png         the figure
#   results/extrapolation/04_training_extrapolation_gpu.ipynb   the executed chapter at GPU size
#   results/extrapolation/throughput.json           training tokens/s, fused LSSAR vs SDPA softmax
# Usage: scripts/gpu_extrapolation.sh            (from the repository root; ~1 hour on one H100)
# Needs: a CUDA build of torch, triton, papermill, ipykernel, matplotlib, tiktoken; the data is fetched with pip
# (python -m freeatten_core.data gpt2) or taken from $FREEATTEN_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=results/extrapolation
mkdir -p "$OUT"
unset TRITON_INTERPRET   # real kernels on the GPU

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'CUDA is not available: this script needs a GPU')"
$PY -m freeatten_core.data gpt2 > /dev/null   # Shakespeare + the GPT-2 rank file, verified by sha256

$PY -m papermill notebooks/04_training_extrapolation.ipynb "$OUT/04_training_extrapolation_gpu.ipynb" \
    -k python3 --cwd notebooks \
    -p preset gpu -p threads 0 \
    -p run_dir "$PWD/runs/extrapolation_gpu" -p results_dir "$PWD/$OUT"

$PY - <<'PYEOF'
from freeatten_core.evaluate import write_json
from freeatten_core.experiments import throughput_comparison
res = throughput_comparison("gpu", command="scripts/gpu_extrapolation.sh (throughput)")
write_json(res, "results/extrapolation/throughput.json")
print(f"training tokens/s: LSSAR (triton) {res['runs']['lssar_triton']['tokens_per_s']:.0f}, "
      f"softmax (SDPA) {res['runs']['softmax_sdpa']['tokens_per_s']:.0f}, "
      f"ratio {res['ratio_lssar_over_softmax']:.2f} (target >= 0.8)")
PYEOF
echo "results in $OUT"
