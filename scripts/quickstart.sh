#!/usr/bin/env bash
# Train the tiny offline model with Pro-GRPO; logs to logs/quickstart (tensorboard --logdir logs).
source "$(dirname "$0")/env.sh"
exec "$PY" -m pro_grpo_lightning fit --config configs/quickstart.yaml "$@"
