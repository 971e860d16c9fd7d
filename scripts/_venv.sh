# Sourced by scripts/run and scripts/test: make .venv and install the pinned requirements
# once (again only when a requirements file changed).
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
SUM="$(cat "$ROOT"/requirements/*.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SUM" ]; then
  echo "txmon: installing requirements/$REQ.txt"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements/$REQ.txt"
  echo "$SUM" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
