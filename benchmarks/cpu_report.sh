#!/usr/bin/env bash
# Re-measure the README's CPU figures: each benchmark compares the fast path with the original
# way in the same run and writes JSON to benchmarks/results/cpu-<date>-<bench>.json.
# Usage: benchmarks/cpu_report.sh [OUT_DIR]   (run on a quiet machine: other load skews timings)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
day=$(date -u +%Y-%m-%d)
bin=.venv/bin/mopro-fast
mkdir -p "$out"
$bin bench convert --json                         > "$out/cpu-$day-convert.json"
$bin bench proto --batch 2048 --classes 1000 --dim 128 --json > "$out/cpu-$day-proto.json"
$bin bench ema --arch resnet50 --json             > "$out/cpu-$day-ema.json"
$bin bench step --arch resnet18 --small-stem --res 32 --batch 64 --classes 10 --json > "$out/cpu-$day-step.json"
$bin bench loader --backend torch --backend dali --backend dali-roi --res 224 --json > "$out/cpu-$day-loader.json"
echo "wrote $out/cpu-$day-{convert,proto,ema,step,loader}.json"
