#!/usr/bin/env bash
# IRRA (sdm+mlm+id) on the three benchmarks; extra flags go to every run.
exec "$(dirname "$0")/three_benchmarks.sh" irra "$@"
