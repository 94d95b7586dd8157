#!/usr/bin/env bash
# SCMM-style heads (our reconstruction: sew+mcm) on the three benchmarks; extra flags go to every run.
# The variant with IRRA's ID loss: bash run_scripts/three_benchmarks.sh scmm/id
exec "$(dirname "$0")/three_benchmarks.sh" scmm "$@"
