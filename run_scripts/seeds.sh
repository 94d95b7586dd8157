#!/usr/bin/env bash
# Train CONFIG with seeds 1..N and print mean +- std over them (tools/collect_results.py); extra
# flags go to every run. One after another by default; with GPUS="0 1 2 3" the seeds run in
# parallel, one per GPU (seed s on GPU number (s-1) mod count). Runs go to $OUT/seed_<s>
# (default OUT=logs/seeds/<config name>); a seed whose run exists is continued with --resume (a
# finished one is left as it is). A failed seed is named and the table is over the others (exit 1).
#   bash run_scripts/seeds.sh configs/irra/cuhk_pedes.yaml 3 --val_dataset val
#   GPUS="0 1 2" bash run_scripts/seeds.sh configs/demo.yaml 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ $# -lt 2 ]; then
  echo "usage: bash run_scripts/seeds.sh CONFIG N [train.py flags]" >&2
  exit 2
fi
config=$1
count=$2
shift 2
if ! [[ $count =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N must be a whole number of seeds (1 or more), got '$count'" >&2
  exit 2
fi
if [ ! -f "$config" ]; then
  echo "error: config file not found: $config" >&2
  exit 2
fi
flags=("$@")
OUT=${OUT:-logs/seeds/$(basename "$config" .yaml)}
read -r -a gpus <<< "${GPUS:-}"

run_seed() {  # seed
  local dir="$OUT/seed_$1" continue=()
  if [ -f "$dir/last.pth" ]; then continue=(--resume); fi
  "$PY" train.py --config_file "$config" --seed "$1" --output_dir "$dir" "${continue[@]}" "${flags[@]}"
}

dirs=()
pids=()
failed=()
wait_wave() {  # each background seed of this wave; a failed one is named, the others go on
  local i
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      failed+=("${wave[$i]}")
      echo "seed ${wave[$i]} failed: $(tail -n 1 "$OUT/seed_${wave[$i]}.out") (log: $OUT/seed_${wave[$i]}.out)" >&2
    fi
  done
  pids=()
  wave=()
}
wave=()
for seed in $(seq 1 "$count"); do
  dirs+=("$OUT/seed_$seed")
  if [ ${#gpus[@]} -gt 0 ]; then
    gpu=${gpus[$(( (seed - 1) % ${#gpus[@]} ))]}
    mkdir -p "$OUT"
    CUDA_VISIBLE_DEVICES=$gpu run_seed "$seed" > "$OUT/seed_$seed.out" 2>&1 &
    pids+=($!)
    wave+=("$seed")
    if [ ${#pids[@]} -eq ${#gpus[@]} ]; then  # every GPU busy: wait for this wave
      wait_wave
    fi
  elif ! run_seed "$seed"; then
    failed+=("$seed")
    echo "seed $seed failed" >&2
  fi
done
wait_wave
if [ ${#failed[@]} -eq "$count" ]; then
  echo "error: every seed failed" >&2
  exit 1
fi
runs=()  # the seeds that made a run directory; unfinished ones are named by collect_results and left out
for dir in "${dirs[@]}"; do
  if [ -f "$dir/configs.yaml" ]; then runs+=("$dir"); fi
done
"$PY" tools/collect_results.py "${runs[@]}"
"$PY" tools/collect_results.py "${runs[@]}" --at last
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: seed(s) ${failed[*]} failed; the table above is over the others" >&2
  exit 1
fi
