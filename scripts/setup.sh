#!/usr/bin/env bash
# Create or refresh the project's virtual environment at .venv.
#
# Re-running is cheap: the install is skipped while pyproject.toml and the
# interpreter are unchanged (a stamp file records their hash). Packages are
# installed with uv (bootstrapped from PyPI into .venv), whose cache
# (~/.cache/uv) makes even a rebuilt .venv take seconds: torch is several GB,
# and pip neither caches it on this machine nor installs it fast. pip is the
# fallback where uv cannot be had.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${LINREC_PYTHON:-python3}"
STAMP="$VENV/.linrec-setup-stamp"

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "setup: $PY not found; install Python >= 3.11 or set LINREC_PYTHON" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup: $PY is $("$PY" -V 2>&1); linrec-stream needs Python >= 3.11" >&2
    exit 1
fi

want="$( { cat "$ROOT/pyproject.toml"; "$PY" -VV; } | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && "$VENV/bin/python" -c 'import linrec_stream' 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi
echo "setup: installing linrec-stream and its dependencies into .venv (first time: torch is several GB)"
if "$VENV/bin/python" -m pip install --quiet "uv>=0.5"; then
    "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" -e "$ROOT[test]"
else
    echo "setup: uv unavailable, installing with pip (slower)"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
fi
echo "$want" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start ))s ($(du -sh "$VENV" | cut -f1) in .venv)"
