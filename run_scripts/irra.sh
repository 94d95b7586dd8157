#!/usr/bin/env bash
# IRRA on the three benchmarks (one GPU each, as in the paper). Data under ./data (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for dataset in cuhk_pedes icfg_pedes rstpreid; do
  "$PY" train.py --config_file "configs/irra/${dataset}.yaml" "$@"
done
