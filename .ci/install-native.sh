#!/usr/bin/env bash
# Build dependencies of the native runtime (runtime/native, issue 15) on a clean Debian 12 / Ubuntu machine:
# the compiler toolchain and libraries from the distribution, and ONNX Runtime's C/C++ headers (Debian 12 has
# no ONNX Runtime package: runtime/native/fetch_ort_headers.sh unpacks Debian 13's libonnxruntime-dev into
# build/deps/onnxruntime). The library itself is the onnxruntime pip wheel's (pip install -e . brings it).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(cmake g++ make ninja-build pkg-config nlohmann-json3-dev libssl-dev libpng-dev ca-certificates
          debian-archive-keyring)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
runtime/native/fetch_ort_headers.sh build/deps/onnxruntime
