#!/usr/bin/env bash
# Train CONFIG with seeds 1..N and print mean +- std over them (tools/collect_results.py); extra
# flags go to every run. One after another by default; with GPUS="0 1 2 3" the seeds run in
# parallel, one per GPU (seed s on GPU number (s-1) mod count). Runs go to $OUT/seed_<s>
# (default OUT=logs/seeds/<config name>); a seed whose run exists is continued with --resume.
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
for seed in $(seq 1 "$count"); do
  dirs+=("$OUT/seed_$seed")
  if [ ${#gpus[@]} -gt 0 ]; then
    gpu=${gpus[$(( (seed - 1) % ${#gpus[@]} ))]}
    mkdir -p "$OUT"
    CUDA_VISIBLE_DEVICES=$gpu run_seed "$seed" > "$OUT/seed_$seed.out" 2>&1 &
    pids+=($!)
    if [ ${#pids[@]} -eq ${#gpus[@]} ]; then  # every GPU busy: wait for this wave
      for pid in "${pids[@]}"; do wait "$pid"; done
      pids=()
    fi
  else
    run_seed "$seed"
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PY" tools/collect_results.py "${dirs[@]}"
"$PY" tools/collect_results.py "${dirs[@]}" --at last
