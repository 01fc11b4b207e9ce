#!/bin/bash
# Screenshots of the dashboard of a run: TensorBoard (the project's venv, $VENV, default .venv) on a
# loopback port, headless Chromium (apt-get install chromium).
# Usage: scripts/dashboard_screenshots.sh LOGDIR OUTDIR PORT
set -e
LOGDIR=$1; OUT=$2; PORT=$3
"${VENV:-.venv}/bin/tensorboard" --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" > "$OUT/tensorboard.log" 2>&1 &
TB=$!
for i in $(seq 1 60); do curl -s "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 2; done
sleep 5
shot() { timeout 180 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=$2 \
  --virtual-time-budget=30000 --screenshot="$OUT/$1" "http://127.0.0.1:$PORT/$3" 2>/dev/null; }
shot dashboard_scalars.png 1500,1250 "#custom_scalars"
kill $TB
