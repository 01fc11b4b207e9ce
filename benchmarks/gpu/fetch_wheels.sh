#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels the GPU machine lacks (it has no network and
# no diffusers / jsonargparse; docs/benchmarks.md) into .whl/ at the repository root, which is
# git-ignored and carried to the GPU machine beside the working tree. Versions: the tested CPU set.
#   benchmarks/gpu/fetch_wheels.sh            # uses python3 -m pip; PIP="..." to override
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --dest .whl \
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 \
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
ls -l .whl
