#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with PyTorch and the project (editable, with dev tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# PyTorch first, as a matching pair (segment-anything needs torchvision).
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
# dev: the test tools (pytest-xdist among them); docs: mkdocs-material for the site (tests/test_docs.py)
.venv/bin/python -m pip install --quiet -e ".[dev,docs]"
# Debian's chromium renders the review gallery in its tests (headless), installed when missing.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: /usr/bin/chromium missing; as root: apt-get install chromium (the gallery tests skip without it)" >&2
    fi
fi
echo "setup done: activate with 'source .venv/bin/activate'"
