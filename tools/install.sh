#!/usr/bin/env bash
# Set up mdu-dist in a virtual environment, on a fresh machine, with no hand steps.
#
#   tools/install.sh            # .venv next to the repo; CPU machines take torch==2.13.0 from the local wheel
#   VENV=/path tools/install.sh
#   MDU_WHEELS=dir tools/install.sh   # offline: every package from a directory of wheels (pip --find-links)
#
# torch is installed first and on its own: a CPU machine has the 2.13.0 CPU wheel on disk, and any range that
# admits a newer torch would pull a multi-GB CUDA build. A GPU image that already has torch keeps its own
# (the venv sees system site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.mdu-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt tools/install.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ -n "${MDU_WHEELS:-}" ]; then
  PIP+=(--no-index --find-links "$MDU_WHEELS")
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${MDU_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -e ".[test]"
touch "$STAMP"
echo "mdu-dist installed in $VENV ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
