#!/usr/bin/env bash
# LGUR (lgur head, its own retrieval features) on the three benchmarks; extra flags go to every run.
exec "$(dirname "$0")/three_benchmarks.sh" lgur "$@"
