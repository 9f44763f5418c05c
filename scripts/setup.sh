#!/usr/bin/env bash
# Sets up a fresh machine: a venv in .venv with the torch CPU pin, then rnnzoo with its extras.
# Idempotent: a second run only checks. torch is pinned first because a looser requirement
# would fetch the newest release with GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# redis-server and nginx: the durable-session and replica tests start their own instances
# (docs/scale-out.md). Installed from the distribution when missing, as root.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
        echo "setup.sh: please install ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu' and not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[train,dev]'
