#!/usr/bin/env bash
# Create .venv (if missing) with PyTorch and charrnn installed, editable, with the test and
# serve and export extras (charrnn serve: fastapi, uvicorn, httptools, uvloop,
# prometheus-client; charrnn export: onnx, onnxruntime).
#
# PyTorch comes first and on its own, because an unpinned `pip install torch` on Linux
# pulls a multi-GB CUDA build. Choose with environment variables:
#   CHARRNN_TORCH        the requirement to install   (default: torch==2.13.0)
#   CHARRNN_TORCH_INDEX  a wheel index for it, e.g. https://download.pytorch.org/whl/cpu
#                        for a small CPU-only build   (default: pip's own configuration)
# An existing torch >= 2.4 in .venv is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then
    echo "setup: installing ${CHARRNN_TORCH:-torch==2.13.0}" >&2
    "${pip[@]}" "${CHARRNN_TORCH:-torch==2.13.0}" ${CHARRNN_TORCH_INDEX:+--index-url "$CHARRNN_TORCH_INDEX"}
fi
"${pip[@]}" -e ".[test,serve,export]"
echo "setup: ready ($(.venv/bin/charrnn --version), torch $(.venv/bin/python -W ignore -c 'import torch; print(torch.__version__)'))" >&2
