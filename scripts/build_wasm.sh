#!/usr/bin/env bash
# Rebuild charrnn/export/web/matvec.wasm.b64 (what `charrnn export --web` inlines) from
# charrnn/export/web/matvec.wat with wabt's wat2wasm, from npm (needs network once; the result
# is committed, so neither users nor CI ever run this).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${WABT_DIR:-/tmp/charrnn-wabt}
if [ ! -x "$tools/node_modules/.bin/wat2wasm" ]; then
    mkdir -p "$tools" && (cd "$tools" && npm install --silent wabt@1.0.36)
fi
"$tools/node_modules/.bin/wat2wasm" charrnn/export/web/matvec.wat -o "$tools/matvec.wasm"
base64 -w0 "$tools/matvec.wasm" > charrnn/export/web/matvec.wasm.b64
echo "charrnn/export/web/matvec.wasm.b64: $(stat -c %s "$tools/matvec.wasm") bytes of WebAssembly" >&2
