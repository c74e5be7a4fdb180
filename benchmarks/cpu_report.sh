#!/usr/bin/env bash
# Re-measure the README's CPU figures: `bench all` on the CPU (one JSON report + markdown table in
# benchmarks/results/cpu-<date>.json/.md), then paste its table into README.md.
# Usage: benchmarks/cpu_report.sh [--quick]   (run on a quiet machine: other load skews timings)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin/mopro-fast
day=$(date -u +%Y-%m-%d)
quick=""
[ "${1:-}" = "--quick" ] && quick="-quick"
report=benchmarks/results/cpu$quick-$day.json
$bin bench all --device cpu --out "$report" "$@"
$bin bench table "$report" --readme README.md > /dev/null
echo "wrote $report (+ .md) and the README table"
