#!/usr/bin/env bash
# Triton's unmodified perf_analyzer in .perf-analyzer/, for tests/test_perf_analyzer.py.
#
# PyPI's perf-analyzer 2.58-2.60 ships only manylinux_2_38 wheels; on glibc 2.36 (Debian 12)
# `pip install perf-analyzer` silently installs a 0.1.0 placeholder with no binary. So the 2.60
# wheel is downloaded for its platform and unpacked, and the binary runs under Debian 13's
# loader, libc6, libstdc++6 and libgcc-s1, unpacked (dpkg-deb -x) into .perf-analyzer/root;
# nothing on the host changes. The .debs come through apt from a private state folder with a
# trixie source (signed by the host's debian-archive-keyring). ssl, crypto and z come from
# the host (older sonames, still compatible).
# Idempotent: a second run only checks. .perf-analyzer/perf_analyzer is the wrapper to call.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$PWD/.perf-analyzer
PY=${PYTHON:-python3}
PIN=${PERF_ANALYZER:-perf-analyzer==2.60}
SUITE=${PERF_ANALYZER_DEBIAN:-trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ -x "$DIR/perf_analyzer" ] && "$DIR/perf_analyzer" --version >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$DIR/dl" "$DIR/root" "$DIR/wheel"
if ! ls "$DIR"/dl/perf_analyzer-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q "$PIN" --platform manylinux_2_38_x86_64 --only-binary=:all: \
        --no-deps -d "$DIR/dl"
fi
"$PY" -m zipfile -e "$(ls "$DIR"/dl/perf_analyzer-*.whl | head -1)" "$DIR/wheel"
chmod +x "$DIR/wheel/perf_analyzer/bin/perf_analyzer"
if ! ls "$DIR"/dl/libc6_*.deb >/dev/null 2>&1; then
    APT="$DIR/apt"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" \
        >"$APT/sources.list"
    O=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
        -o Dir::State::status=/dev/null -o APT::Architecture=amd64
        -o APT::Sandbox::User=root)
    apt-get "${O[@]}" -qq update
    (cd "$DIR/dl" && apt-get "${O[@]}" -qq download libc6 libstdc++6 libgcc-s1)
    rm -rf "$APT"
fi
for deb in "$DIR"/dl/*.deb; do
    dpkg-deb -x "$deb" "$DIR/root"
done
LIB=$DIR/root/usr/lib/x86_64-linux-gnu
cat >"$DIR/perf_analyzer" <<WRAP
#!/usr/bin/env bash
# perf_analyzer 2.60 under Debian 13's loader and libraries (scripts/setup-perf-analyzer.sh)
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \\
    "$DIR/wheel/perf_analyzer/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$DIR/perf_analyzer"
"$DIR/perf_analyzer" --version
