#!/usr/bin/env bash
# Create ./.venv and install detr_ot into it (editable). `bash tools/setup_env.sh test` adds the test extras.
# Override the interpreter with PYTHON=python3.X and the venv location with VENV=path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch/torchvision first, pinned to releases that match each other (on the project's machines they come
# from local disk; elsewhere pip downloads them).
"$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
if [ "${1:-}" = "test" ]; then
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
else
  "$VENV/bin/python" -m pip install --quiet -e .
fi
echo "environment ready: $VENV"
