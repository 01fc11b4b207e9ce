"""The package's own errors: a setting, a file or a reward that cannot work, said in one line.

``pro-grpo`` / ``python -m pro_grpo_lightning`` (every command, ``cli.run_main``) print such errors
(and ``ValueError`` / ``FileNotFoundError`` raised while reading a config) as ``error: <message>``
and exit with status 2 (a setting or a file the user gave) or 1 (the run stopped: a reward that
failed, non-finite values, an output that cannot be written); ``PRO_GRPO_DEBUG=1`` shows the full
traceback instead.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting (or a checkpoint) that cannot work: the message names the field and the value."""


class RewardError(RuntimeError):
    """A reward that raised or returned something other than one score per image (names the reward)."""


class OutputError(RuntimeError):
    """A file or folder that cannot be written (names the path, and says what was kept)."""
