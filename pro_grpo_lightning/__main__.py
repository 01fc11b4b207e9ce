import sys

from .cli import command_main

# ``python -m pro_grpo_lightning fit|validate|test|predict|plan|adapt|export|serve-reward ...``: the same
# commands as the ``pro-grpo`` script. A settings or file error prints one line (``error: ...``) and
# exits 2; a run stopped by the non-finite guard or by an unreachable reward server exits 1;
# PRO_GRPO_DEBUG=1 shows the full traceback instead.
sys.exit(command_main(sys.argv[1:]))
