#!/usr/bin/env bash
# The whole test suite, offline, CPU.
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q "$@"
