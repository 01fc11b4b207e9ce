#!/usr/bin/env bash
# The whole test suite, offline, CPU, on PYTEST_WORKERS pytest-xdist workers (default 2: the suite's
# CLI tests spend much of their time importing in fresh processes, which a second worker overlaps).
# PYTEST_WORKERS=0 runs it in one process.
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"
