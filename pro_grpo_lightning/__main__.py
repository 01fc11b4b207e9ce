import sys

from .cli import main
from .rewards.remote import RemoteRewardError

try:
    main()
except FileNotFoundError as err:  # missing weights / offline: the message says it all, no library stack
    print(f"FileNotFoundError: {err}", file=sys.stderr)
    sys.exit(1)
except RemoteRewardError as err:  # the reward server is down or misbehaves: one line, not a stack
    print(f"RemoteRewardError: {err}", file=sys.stderr)
    sys.exit(1)
