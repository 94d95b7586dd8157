#!/usr/bin/env bash
# UIT / SEN (sdm+id+cmt+tir) on the three benchmarks (one GPU each, as in the paper). Data under ./data (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for dataset in cuhk_pedes icfg_pedes rstpreid; do
  "$PY" train.py --config_file "configs/uit/${dataset}.yaml" "$@"
done
