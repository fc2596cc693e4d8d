#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with PyTorch and the project (editable, with dev tools),
# then Debian's chromium when it can be had (optional). Sourced (the tests do), it only defines its steps.
set -euo pipefail

install_python_env() {
    local python=${PYTHON:-python3}
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    # PyTorch first, as a matching pair (segment-anything needs torchvision).
    .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    # dev: the test tools (pytest-xdist among them); docs: mkdocs-material for the site (tests/test_docs.py)
    .venv/bin/python -m pip install --quiet -e ".[dev,docs]"
    # The project's bytecode (an editable install leaves it to the first import, which writes none where
    # PYTHONDONTWRITEBYTECODE is set: every Ray worker and actor then compiles the project again)
    .venv/bin/python -m compileall -q freecustom_core stages pipeline >/dev/null
}

# Chromium renders the review gallery in its tests (headless). Optional: where it cannot be installed (no
# apt-get, not root, no such package) the set-up says so and still succeeds; the gallery tests then skip.
install_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        return 0
    fi
    local why
    if ! command -v apt-get >/dev/null 2>&1; then
        why="no apt-get on this machine"
    elif [ "$(id -u)" -ne 0 ]; then
        why="not root; as root: apt-get install chromium"
    elif (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
        return 0
    else
        why="apt-get install chromium failed: the package is not available here"
    fi
    echo "note: chromium not installed ($why). It is optional: only the review gallery's browser tests" \
         "use it, and they skip without it; put any Chromium on PATH as chromium to run them." >&2
}

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    install_python_env
    install_chromium
    echo "setup done: activate with 'source .venv/bin/activate'"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
