"""``python -m pro_grpo_lightning fit --config configs/X.yaml``: Lightning's own CLI.

The backend, the rewards and the schedule are ``class_path`` blocks in the YAML; every other
setting is a typed argument of ``ProGRPOModule`` / ``PromptDataModule`` / ``Trainer`` (see
``--help`` and ``--print_config``). ``main(args)`` is importable so tests drive the CLI in-process.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import PromptDataModule
from .module import ProGRPOModule


def main(args: list[str] | None = None, run: bool = True, save_config: bool = True) -> LightningCLI:
    """The CLI; ``run=False`` only builds the module, datamodule and trainer (scripts, benchmarks).
    ``save_config=False`` keeps ``fit`` from writing the resolved config.yaml (runs without a logger)."""
    if not save_config:
        return LightningCLI(ProGRPOModule, PromptDataModule, args=args, run=run, save_config_callback=None)
    return LightningCLI(ProGRPOModule, PromptDataModule, args=args, run=run,
                        save_config_kwargs={"overwrite": True})
