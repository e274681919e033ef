#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU (under 9 minutes on an H200):
# the CUDA-marked tests (the start mix, the serving engine, an ONNX export of a CUDA
# model and host-mapped corpus ids among them), then a 1 GB corpus prepared and trained
# on the GPU against a 1 MB one (scripts/bench_data.py, the embedded docs' paragraphs
# shuffled), then the full benchmark on the GPU (training chars/s with cuDNN + bf16,
# sampling with 1 and 1024 streams through the CUDA-graph decoder).
#   bash scripts/gpu_check.sh [OUT_DIR]
# Writes gpu_tests.log, gpu_data.log and gpu_bench.log (the last lines are JSON) to OUT_DIR.
#
# The quality check, separately (a device call runs at most 10 minutes):
#   bash scripts/gpu_check.sh OUT_DIR quality 3m     # ~7.5 min: the prose corpus built, then the pair
#   bash scripts/gpu_check.sh OUT_DIR quality 10m    # charrnn's side alone (10 min), then
#   bash scripts/gpu_check.sh OUT_DIR loop 10m       # the loop's (10 min), in another call
# charrnn's defaults (`charrnn train prose --time T`, sizing from the GPU's probe) against the
# plain loop at 3x512 fp32 on the GPU, on the prose corpus scripts/corpora.py builds from the
# machine's own Python (no download): the War and Peace-like check of docs/benchmarks.md.
# Writes gpu_quality_T.log / gpu_loop_T.log (each row also as a JSON line).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${2:-}" = quality ] || [ "${2:-}" = loop ]; then
    budget=${3:-3m}
    only=(); [ "$2" = loop ] && only=(--only loop)
    [ "$2" = quality ] && [ "$budget" != 3m ] && only=(--only charrnn)
    $py scripts/yardstick.py prose --time "$budget" --device cuda --loop-size 3x512 --json "${only[@]}" \
        --keep /tmp/charrnn-gpu-runs 2>&1 | tee "$out/gpu_${2}_${budget}.log"
    rc=${PIPESTATUS[0]}
    cp /tmp/charrnn-gpu-runs/prose-"$budget"/metrics.jsonl "$out/gpu_${2}_${budget}_metrics.jsonl" 2>/dev/null
    exit "$rc"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_info.txt"
$py -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
CHARRNN_CACHE=/tmp/charrnn-gpu-cache timeout 150 $py scripts/bench_data.py --sizes 1G --no-eval --device cuda \
    --work /tmp/charrnn-gpu-data 2>&1 | tee "$out/gpu_data.log"
data=${PIPESTATUS[0]}
timeout 330 $py scripts/bench.py --device cuda --sample-streams 1,1024 --skip encode 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, data exit $data, bench exit $bench"
exit $(( tests || data || bench ))
