import sys

if sys.argv[1:2] == ["plan"]:  # the memory plan: no Trainer, no weights (plan.py)
    from .plan import main as plan_main

    sys.exit(plan_main(sys.argv[2:]))
if sys.argv[1:2] == ["adapt"]:  # pruning points chosen from audit rollouts (adaptive.py)
    from .adaptive import main as adapt_main
    from .cli import run_main

    sys.exit(run_main(adapt_main, sys.argv[2:]))

from .cli import console_main  # noqa: E402

# A settings or file error prints one line (``error: ...``) and exits 2; a run stopped by the
# non-finite guard or by an unreachable reward server exits 1; PRO_GRPO_DEBUG=1 shows the full
# traceback instead.
console_main()
