#!/usr/bin/env bash
# A separate venv, .venv-triton, with the unmodified tritonclient[grpc] for the KServe v2 /
# Triton protocol tests (tests/test_kserve_tritonclient.py). Separate because tritonclient pins
# protobuf < 7 while rnnzoo's generated code needs protobuf >= 7.35 (docs/kserve.md).
# Idempotent: a second run only checks. TRITONCLIENT may pin another version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-triton
PIN=${TRITONCLIENT:-tritonclient[grpc]==2.73.0}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import tritonclient.grpc, numpy" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "$PIN" numpy
fi
