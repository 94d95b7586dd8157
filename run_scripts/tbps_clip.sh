#!/usr/bin/env bash
# TBPS-CLIP on the three benchmarks: the full recipe, or with --simplified the simplified one;
# extra flags go to every run (e.g. --annotation_format raw --back_translation_prob 0).
#   bash run_scripts/tbps_clip.sh [--simplified] [train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
suffix=""
if [ "${1:-}" = "--simplified" ]; then
  suffix="_simplified"
  shift
fi
for dataset in cuhk_pedes icfg_pedes rstpreid; do
  "$PY" train.py --config_file "configs/tbps_clip/${dataset}${suffix}.yaml" "$@"
done
