# Sourced by scripts/quickstart.sh and scripts/test.sh: make .venv (once) with the pinned set.
# Python 3.11+ on PATH as python3 (or set PYTHON). Nothing is downloaded from a model hub.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
stamp="$VENV/.installed-$(cat "$ROOT/requirements/ci.txt" "$ROOT/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "[setup] creating $VENV with the pinned dependencies (about a minute, once)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, alone and pinned, so no resolver ever picks a CUDA build on a CPU machine
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' "$ROOT/requirements/ci.txt")"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements/ci.txt" -e "$ROOT[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
PY="$VENV/bin/python"
cd "$ROOT"
