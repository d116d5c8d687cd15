#!/usr/bin/env bash
# Build the wheelhouse that tools/gpu_check.sh installs from on a GPU machine without network.
#
#   tools/build_wheels.sh                      # wheelhouse/ for CPython 3.12 on x86_64 Linux (the GPU image)
#   WHEEL_PYTHON_VERSION=3.11 WHEELHOUSE=wheelhouse/py311 tools/build_wheels.sh   # for this machine (dry run)
#
# The packages of tools/gpu-requirements.txt and their dependencies are resolved in the development venv
# (PYTHON, default .venv/bin/python) to the versions installed there, less torch and what torch itself
# requires (the image has those). Each is then downloaded as a wheel for the target Python and platform, or,
# where PyPI has only a source distribution (deepspeed), built here into a pure-Python wheel. Prints the total.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET=${WHEEL_PYTHON_VERSION:-3.12}
OUT=${WHEELHOUSE:-wheelhouse}
mkdir -p "$OUT"

pins=$("$PYTHON" tools/wheel_pins.py tools/gpu-requirements.txt "$TARGET")
abi="cp${TARGET/./}"
PIP=("$PYTHON" -m pip --disable-pip-version-check -q)
for pin in $pins; do
  if ! "${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$TARGET" --implementation cp \
        --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$OUT" "$pin" 2>/dev/null; then
    # Source distribution only: build it here (DeepSpeed's ops are JIT-built at run time, so the wheel is
    # pure Python whatever machine builds it).
    DS_BUILD_OPS=0 "${PIP[@]}" wheel --no-deps -w "$OUT" "$pin"
  fi
done
count=$(ls "$OUT"/*.whl | wc -l)
echo "$count wheels in $OUT: $(du -sh "$OUT" | cut -f1) ($(du -sb "$OUT" | cut -f1) bytes)"
