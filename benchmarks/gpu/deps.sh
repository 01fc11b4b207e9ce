# Sourced by the GPU scripts: install the packages that do not import on the GPU machine (no network
# there: diffusers, jsonargparse and their needs) from the wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh)
# into $DEPS, never into the system environment, and put $DEPS on PYTHONPATH. Needs PY and DEPS set.
missing=()
for spec in diffusers:diffusers importlib_metadata:importlib_metadata zipp:zipp lazy_importer:lazy_importer \
            jsonargparse:jsonargparse docstring_parser:docstring_parser typeshed_client:typeshed_client; do
  mod=${spec%%:*}; pkg=${spec##*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing from .whl/: ${missing[*]}"
  wheels=()
  for pkg in "${missing[@]}"; do
    w=$(ls .whl/"${pkg}"-*.whl .whl/"${pkg//_/-}"-*.whl 2>/dev/null | head -n1)
    if [ -z "$w" ]; then echo "[deps] no wheel for $pkg in .whl/ (run benchmarks/gpu/fetch_wheels.sh)"; continue; fi
    wheels+=("$w")
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "${wheels[@]}" || echo "[deps] pip install failed"
    export PYTHONPATH="$PYTHONPATH:$DEPS"
  fi
fi
"$PY" -c "import diffusers, torch; print('[deps] torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
