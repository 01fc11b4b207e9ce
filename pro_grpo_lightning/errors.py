"""The package's own error: a setting or a file that cannot work, said in one line.

``python -m pro_grpo_lightning`` and ``python -m pro_grpo_lightning.export`` print such errors
(and ``ValueError`` / ``FileNotFoundError`` raised while reading a config) as ``error: <message>``
and exit with status 2; ``PRO_GRPO_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse


class ConfigError(ValueError):
    """A setting (or a checkpoint) that cannot work: the message names the field and the value."""


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are a ``ConfigError`` (one ``error:`` line, exit 2, from
    ``cli.run_main``) instead of a usage dump; ``--help`` is unchanged."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")
