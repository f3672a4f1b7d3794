#!/bin/sh
# Fetch ONNX Runtime's C/C++ headers for building libiia_runtime on Debian 12 (which has no ONNX Runtime
# package): Debian 13's libonnxruntime-dev .deb is downloaded with apt-get using a SEPARATE sources list and
# lists directory (the system's apt configuration is not touched) and unpacked with dpkg -x into DEST
# (default build/deps/onnxruntime). Headers land in DEST/usr/include/onnxruntime. ONNX Runtime's C API is
# backward compatible: these 1.21 headers compile against, and run on, the pip wheel's newer library.
set -eu
DEST=${1:-build/deps/onnxruntime}
if [ -f "$DEST/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
    echo "ONNX Runtime headers already in $DEST/usr/include/onnxruntime"
    exit 0
fi
for tool in apt-get dpkg; do
    command -v $tool >/dev/null || { echo "fetch_ort_headers.sh needs $tool (Debian/Ubuntu); elsewhere pass -DONNXRUNTIME_ROOT=<an official ONNX Runtime release>" >&2; exit 1; }
done
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || { echo "$KEYRING missing: apt-get install debian-archive-keyring" >&2; exit 1; }
mkdir -p "$DEST"
WORK=$(cd "$DEST/.." && pwd)/$(mktemp -u onnxruntime-fetch.XXXXXX)
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial"
echo "deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie main" > "$WORK/sources.list"
APT="-oDir::Etc::SourceList=$WORK/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$WORK/lists -oDir::Cache::Archives=$WORK/archives -oAPT::Sandbox::User=root"
# shellcheck disable=SC2086
apt-get update -qq $APT
# shellcheck disable=SC2086
(cd "$WORK" && apt-get download -qq $APT libonnxruntime-dev)
dpkg -x "$WORK"/libonnxruntime-dev_*.deb "$WORK/x"
rm -rf "$DEST"
mv "$WORK/x" "$DEST"
echo "ONNX Runtime headers in $DEST/usr/include/onnxruntime ($(ls "$WORK"/libonnxruntime-dev_*.deb | xargs -n1 basename))"
