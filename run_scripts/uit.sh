#!/usr/bin/env bash
# UIT / SEN (sdm+id+cmt+tir) on the three benchmarks; extra flags go to every run.
exec "$(dirname "$0")/three_benchmarks.sh" uit "$@"
