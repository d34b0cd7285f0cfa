#!/usr/bin/env bash
# The committed multi-seed run of the `cpu` preset (results/cpu/seeds/): the extrapolation experiment once per
# training seed, on one thread, each seed in its own run and results folder. Finished runs resume (a checkpoint
# at the end of training is reused), so a killed run continues where it stopped.
#
#   scripts/run_cpu_seeds.sh [SEEDS] [VARIANTS]      # defaults: "0 1 2", softmax,lssa,lssar,lssa+reweight@eval
#   nohup nice -n 10 scripts/run_cpu_seeds.sh > runs/cpu_seeds.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
VARIANTS=${2:-"softmax,lssa,lssar,lssa+reweight@eval"}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for seed in $SEEDS; do
    echo "== seed $seed: $VARIANTS ($(date -u +%FT%TZ))"
    "$PY" -m freeatten_core experiments extrapolation --preset cpu --variants "$VARIANTS" --set seed="$seed" \
        --run-dir "runs/cpu_seeds/seed$seed" --out "results/cpu/seeds/seed$seed" --progress
done
echo "== done ($(date -u +%FT%TZ))"
