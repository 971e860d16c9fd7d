# Sourced by scripts/run and scripts/test: make .venv and install the hash-pinned lock file
# (requirements/<set>.lock, made by pip-compile from <set>.in) once, again only when one changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQ="${1:-base}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "txmon: creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.txmon-$REQ.sha"
SUM="$(cat "$ROOT"/requirements/*.lock | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SUM" ]; then
  echo "txmon: installing requirements/$REQ.lock"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$ROOT/requirements/$REQ.lock"
  echo "$SUM" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
