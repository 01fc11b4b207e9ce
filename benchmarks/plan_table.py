"""The README's fit-table rows from stored ``plan --json`` reports (docs/results/plan/).

    python -m benchmarks.plan_table docs/results/plan/sdxl_hps_pro_grpo.json [...]

``pro_grpo_lightning.plan.fit_table`` of the given reports (header included), the table the README
shows and ``tests/test_plan.py`` checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pro_grpo_lightning.plan import fit_table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="plan --json outputs")
    print(fit_table([json.loads(path.read_text()) for path in p.parse_args(argv).reports]))


if __name__ == "__main__":
    main()
