#!/usr/bin/env bash
# APTM's text-matching stream (aptm_itc+itm+aptm_mlm, ITM re-ranking) on the three benchmarks;
# extra flags go to every run.
exec "$(dirname "$0")/three_benchmarks.sh" aptm "$@"
