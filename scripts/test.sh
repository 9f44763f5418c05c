#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv first if needed). Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# tritonclient[grpc] in its own venv (it pins protobuf<7): the KServe v2 tests run it
bash scripts/setup-tritonclient.sh || exit 1
# Triton's perf_analyzer (PyPI wheel for glibc 2.38 + Debian 13's runtime in a private folder)
bash scripts/setup-perf-analyzer.sh || exit 1
# speechbrain, pytorch-forecasting, darts, asteroid, neuralforecast, flair and silero-vad beside
# torch 2.13.0 in their own venv: the export gallery (tests/test_gallery.py) and the Silero VAD
# contract test (tests/test_contract_silero.py) run them
bash scripts/setup-gallery.sh || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
# type check: the whole package, strict on rnnzoo.server.runtime (pyproject.toml [tool.mypy])
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a broken suite here, say so plainly.
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
