#!/usr/bin/env bash
# One GPU check of mopro-fast, for a CUDA machine that has torch and torchvision but no internet.
#
# Runs `mopro-fast bench all` with the GPU profile (mopro_fast/bench/suite.py): conversion, the
# two-view loader at 224 px (nvjpeg, and every other backend that imports), the prototype and EMA
# updates, the MoPro step (ResNet-50, batch 256, bf16, channels-last, with and without
# torch.compile, against the original-style step), and e2e training from shards with the nvjpeg
# backend. Shards are built on the spot from the built-in data set at web-like sizes (448 px,
# stored at ~384 x 450-510). Writes the JSON report and its markdown table to $OUT (or --out DIR),
# named <device>-<date>.json/.md (e.g. h200-2026-12-01.json).
#
# Then `mopro-fast bench res` (mopro_fast/bench/sweep.py), the figures `mopro-fast plan` reads: the
# same MoPro step at 160, 192 and 224 px (same profile: ResNet-50, batch 256, bf16, channels-last;
# 1 warm-up + 3 timed rounds per side) and the nvjpeg loader at the fast recipe's 160 and 192 px
# (3 windows each, one set of generated shards), to <device>-res-<date>.json next to the report:
#     mopro-fast plan recipes/rn50_fast_8gpu.yaml --gpus 8 --img-s-per-gpu $OUT/h200-res-<date>.json
# Budget on one H200: under 8 minutes in all, bench all taking most of it and bench res about 2
# (an estimate from its work: three step sides, shards of 1,000 images, two loader sides; the script
# prints the seconds of each part). Then `mopro-fast bench loader --baseline original` with the GPU
# decoders (about a minute), to <device>-loader-<date>.json. Exit status: bench all's, else the others'.
#
# Pure-Python dependencies missing there (webdataset, braceexpand, omegaconf) are installed from
# wheels carried in a folder: --wheels DIR or $MOPRO_WHEELS. Fetch them on a machine with internet:
#     make device-wheels            # -> benchmarks/wheels/ (git-ignored), versions of requirements.lock
#
# Usage:
#     benchmarks/device_check.sh [--wheels DIR] [--out DIR] [--device cuda|cpu] [--quick] [bench all options...]
#     benchmarks/device_check.sh --device cpu --quick      # the same script end to end on a CPU, tiny
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

python=${PYTHON:-python3}
wheels=${MOPRO_WHEELS:-benchmarks/wheels}
out=${OUT:-benchmarks/results}
device=cuda
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) extra+=("$1"); shift ;;
    esac
done

say() { echo "device_check: $*" >&2; }
start=$(date +%s)

# 1. Dependencies: install carried wheels only for what does not import.
missing=$("$python" - <<'EOF'
import importlib.util
need = {"webdataset": "webdataset", "braceexpand": "braceexpand", "omegaconf": "omegaconf"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    say "installing $missing from $wheels"
    files=()
    for pkg in $missing; do
        found=$(ls "$wheels"/"$pkg"-*.whl 2>/dev/null | head -n 1 || true)
        if [ -z "$found" ]; then
            say "no wheel for $pkg in $wheels: run 'make device-wheels' on a machine with internet and carry the folder (or pass --wheels DIR)"
            exit 2
        fi
        files+=("$found")
    done
    "$python" -m pip install --quiet --no-index --no-deps "${files[@]}"
fi
"$python" - <<'EOF' || { say "a required package is missing (see above)"; exit 2; }
import importlib.util, sys
need = ["torch", "torchvision", "webdataset", "braceexpand", "omegaconf", "yaml", "click", "numpy", "PIL", "tqdm"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print("device_check: missing Python packages: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF

# 2. The benchmarks (the repository itself is imported from here: no install needed).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch, torchvision; print('device_check: torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" >&2
mkdir -p "$out"
day=$(date -u +%Y-%m-%d)
slug=$("$python" -c "
import torch
from mopro_fast.bench.suite import device_slug
print(device_slug({'gpu': torch.cuda.get_device_name()} if '$device'.startswith('cuda') and torch.cuda.is_available() else {}))")
quick=""
for arg in "${extra[@]+"${extra[@]}"}"; do [ "$arg" = "--quick" ] && quick="-quick"; done
report="$out/$slug$quick-$day.json"
sides="$out/$slug$quick-res-$day.json"
set +e
"$python" -m mopro_fast.cli bench all --device "$device" --e2e-backend nvjpeg --out "$report" "${extra[@]+"${extra[@]}"}"
status=$?
say "bench all: status $status, $(( $(date +%s) - start )) s so far"

# 3. Step and loader figures per crop side, for `mopro-fast plan` (quick: the tiny profile's sides).
"$python" -m mopro_fast.cli bench res --device "$device" --backend nvjpeg --out "$sides" ${quick:+--quick}
res_status=$?

# 4. The CPU data path's yardsticks beside the GPU decoders: the original's PIL loader and the
#    decode-only ceiling on the host's cores, nvjpeg (and dali's mixed decode when DALI imports) on
#    the device, at the recipes' crop sizes (quick: the tiny data, one size).
loader="$out/$slug$quick-loader-$day.json"
backends="--backend nvjpeg"
"$python" -c "import nvidia.dali" >/dev/null 2>&1 && backends="$backends --backend dali"
sizes="--res 224 --res 160 --res 112"
[ -n "$quick" ] && sizes="--quick --res 64"
"$python" -m mopro_fast.cli bench loader --baseline original --device "$device" $backends $sizes \
    --windows 3 --json > "$loader"
loader_status=$?
set -e
[ "$res_status" -eq 0 ] && res_status=$loader_status
[ "$status" -eq 0 ] && status=$res_status
say "report $report (+ .md), per-side figures $sides, loader yardsticks $loader, status $status, $(( $(date +%s) - start )) s in all"
exit $status
