#!/bin/bash
# Pictures of a finished run's dashboard for docs/images/: TensorBoard (the project's venv, $VENV,
# default .venv) on a loopback port, drawn by headless Chromium (apt-get install chromium).
# Usage: scripts/dashboard_screenshots.sh LOGDIR OUTDIR PORT
# Run it from the folder LOGDIR is relative to (TensorBoard shows LOGDIR as given), after the run
# has finished (a run caught early shows one point per chart). Writes
#   dashboard_scalars.png          the Custom Scalars tab (the layout the run writes, dashboard.py):
#                                  reward and held-out score, spread within groups, pruning
#   dashboard_scalars_compute.png  the same page further down: compute, losses, health
#   dashboard_val_images.png       the last val/images picture, read out of the event file at its
#                                  own size (TensorBoard's Images tab shows it scaled to a card)
set -e
LOGDIR=$1; OUT=$2; PORT=$3
PY="${VENV:-.venv}/bin/python"
mkdir -p "$OUT"
"${VENV:-.venv}/bin/tensorboard" --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" > "$OUT/tensorboard.log" 2>&1 &
TB=$!
trap 'kill $TB' EXIT
for i in $(seq 1 60); do curl -s "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 2; done
sleep 5
timeout 300 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,2900 \
  --virtual-time-budget=60000 --screenshot="$OUT/page.png" "http://127.0.0.1:$PORT/#custom_scalars" 2>/dev/null
"$PY" - "$OUT" "$LOGDIR" <<'PYEOF'
import glob, io, os, sys
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out, logdir = sys.argv[1], sys.argv[2]
page = Image.open(os.path.join(out, "page.png"))
page.crop((0, 0, 1500, 1255)).save(os.path.join(out, "dashboard_scalars.png"))  # sections 1-3
page.crop((0, 1255, 1500, 2800)).save(os.path.join(out, "dashboard_scalars_compute.png"))  # sections 4-6
os.remove(os.path.join(out, "page.png"))
(events,) = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
acc = EventAccumulator(events, size_guidance={"images": 0})
acc.Reload()
last = acc.Images("val/images")[-1]
Image.open(io.BytesIO(last.encoded_image_string)).save(os.path.join(out, "dashboard_val_images.png"))
print(f"val/images at step {last.step}")
PYEOF
