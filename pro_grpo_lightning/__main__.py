import sys

if sys.argv[1:2] == ["plan"]:  # the memory plan: no Trainer, no weights (plan.py)
    from .plan import main as plan_main

    sys.exit(plan_main(sys.argv[2:]))

from .cli import main  # noqa: E402
from .rewards.remote import RemoteRewardError  # noqa: E402

try:
    main()
except FileNotFoundError as err:  # missing weights / offline: the message says it all, no library stack
    print(f"FileNotFoundError: {err}", file=sys.stderr)
    sys.exit(1)
except RemoteRewardError as err:  # the reward server is down or misbehaves: one line, not a stack
    print(f"RemoteRewardError: {err}", file=sys.stderr)
    sys.exit(1)
