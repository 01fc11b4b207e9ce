"""Proxy quality from an audit run's CSV log: mean and 95 % t-interval over rollouts of each metric.

    python -m pro_grpo_lightning fit --config configs/quickstart.yaml --model.rollout.audit_every_n_rollouts=1 \\
        --model.optimizer.init_args.lr=0 --trainer.max_steps=12 ... \\
        --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=DIR
    python -m benchmarks.proxy_quality DIR/.../metrics.csv

With lr 0 every rollout samples the base policy, so rollouts are independent draws and a t-interval
over them is the honest spread. Reported: ``pruning/audit_proxy_corr_full_<i>`` (checkpoint i's
preview-to-final correlation over the whole expanded group), ``pruning/proxy_true_corr_survivors_<i>``
(the same over the final survivors only, selected for their preview spread), ``pruning/audit_overlap``
(share of the survivors the true reward's choice would also keep), the expanded group's and the
survivors' true-reward spread (``pruning/audit_expanded_reward_std``, ``reward/group_std``).
"""

from __future__ import annotations

import csv
import sys
from typing import Any

from .stats import mean_ci

PREFIXES = ("pruning/audit_", "pruning/proxy_true_corr", "reward/group_std", "reward/mean")


def summarize(path: str) -> dict[str, dict[str, Any]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    keys = sorted({k for r in rows for k in r if k.startswith(PREFIXES)})
    return {k: mean_ci([float(r[k]) for r in rows if r.get(k) not in (None, "")]) for k in keys}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    out = summarize(argv[0])
    for k, v in out.items():
        print(f"{k}: {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}] (n = {v['n']} rollouts)")
    return out


if __name__ == "__main__":
    main()
