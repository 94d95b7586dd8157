#!/usr/bin/env bash
# RDE on the three benchmarks at noise rate R (0, 0.2, 0.5, 0.8: RDE's files come from the same
# generator); extra flags go to every run.
#   bash run_scripts/rde.sh 0.5
set -euo pipefail
rate=${1:?usage: rde.sh NOISY_RATE [flags]}
shift
exec "$(dirname "$0")/three_benchmarks.sh" rde --noisy_rate "$rate" --name "rde_n${rate}" "$@"
