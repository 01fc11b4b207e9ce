"""Short CLI runs of the tiny SD1.5 model that several tests share (DDP, eval, export, resume).

Each run layers three configs: ``configs/tiny_sd15.yaml``, the shared base below (a tiny, fast
model that logs to CSV and checkpoints every step into ``<out>``), and the test's own overrides.
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
trainer:
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{out}", name: run}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{out}/ckpt", save_last: true, every_n_train_steps: 1}}
model:
  backend:
    class_path: pro_grpo_lightning.backends.sd15.TinySD15Backend
    init_args: {{num_steps: 4, resolution: 32, guidance_scale: 3.0, seed: 0, lora: {{rank: 4, alpha: 4}}}}
  schedule:
    class_path: pro_grpo_lightning.schedules.ProGRPOSchedule
    init_args: {{group_size: 4, checkpoints: [1], keep: [2], rule: ovf}}
  samples: {{every_n_rollouts: 0}}
"""

#: the checkpoint callback plus the LoRA export, for overrides that replace ``trainer.callbacks``
CALLBACKS_WITH_EXPORT = """\
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{out}/ckpt", save_last: true, every_n_train_steps: 1}}
    - class_path: pro_grpo_lightning.export.ExportLoRA
"""


def config_args(tmp_path: Path, name: str, override: str, out: Path | None = None, **fmt: object) -> list[str]:
    """Write the base and the test's override (both ``str.format``-ed with ``out`` and ``fmt``) and
    return the ``--config`` arguments for ``fit`` / ``validate`` / ``test``."""
    out = out or tmp_path
    values = {"out": out.as_posix(), **fmt}
    base, extra = tmp_path / f"{name}.base.yaml", tmp_path / f"{name}.yaml"
    base.write_text(BASE.format(**values))
    extra.write_text(override.format(**values))
    return ["--config", str(ROOT / "configs/tiny_sd15.yaml"), "--config", str(base), "--config", str(extra)]


def config_command(config: Path) -> list[str]:
    """The ``--config`` arguments of the command on a shipped config's first line (absolute paths):
    ``--config configs/x.yaml``, or a base and its overlay ``--config configs/base.yaml --config
    configs/x.yaml``. The config itself is always the last one."""
    if config.resolve().parent != ROOT / "configs":  # a test's own config file: itself alone
        return ["--config", str(config)]
    first = config.read_text().splitlines()[0]
    assert first.startswith("# python -m pro_grpo_lightning fit --config "), first
    args = first.split(" fit ", 1)[1].split("  ")[0].split()  # two spaces start a remark
    assert args[-1] == f"configs/{config.name}" and args[::2] == ["--config"] * (len(args) // 2), first
    return [str(ROOT / a) if a.startswith("configs/") else a for a in args]


def run_metrics(out: Path, key: str) -> list[dict[str, float]]:
    """The rows of the run's CSV log (``<out>/run/<version>/metrics.csv``, one run) where ``key``
    was logged, each as its non-empty cells in float."""
    (path,) = glob.glob(str(out / "run" / "*" / "metrics.csv"))
    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get(key)]


def edited_config_copy(trained: Path, dst: Path, edit) -> Path:
    """A copy of ``trained`` whose stored run config (plain text, no pickle) was edited by ``edit(cfg)``."""
    state = torch.load(trained, weights_only=True)
    cfg = yaml.safe_load(state["pro_grpo"]["config"])
    edit(cfg)
    state["pro_grpo"]["config"] = yaml.safe_dump(cfg)
    torch.save(state, dst)  # the tensors did not change: the digest still matches
    return dst
