#!/usr/bin/env bash
# Train METHOD (a folder of configs/) on CUHK-PEDES, ICFG-PEDES and RSTPReid, one run each on one
# GPU, as in the papers; extra flags go to every run. Data under ./data (see README).
#   bash run_scripts/three_benchmarks.sh irra --batch_size 32
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
method=$1
shift
for dataset in cuhk_pedes icfg_pedes rstpreid; do
  "$PY" train.py --config_file "configs/${method}/${dataset}.yaml" "$@"
done
