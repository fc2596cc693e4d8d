#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with PyTorch and the project (editable, with dev tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# PyTorch first, as a matching pair (segment-anything needs torchvision).
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "setup done: activate with 'source .venv/bin/activate'"
