#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU (under 9 minutes on an H200):
# the CUDA-marked tests (the start mix, the serving engine, an ONNX export of a CUDA
# model and host-mapped corpus ids among them), then a 1 GB corpus prepared and trained
# on the GPU against a 1 MB one (scripts/bench_data.py, the embedded docs' paragraphs
# shuffled), then the full benchmark on the GPU (training chars/s with cuDNN + bf16,
# sampling with 1 and 1024 streams through the CUDA-graph decoder).
#   bash scripts/gpu_check.sh [OUT_DIR]
# Writes gpu_tests.log, gpu_data.log and gpu_bench.log (the last lines are JSON) to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
