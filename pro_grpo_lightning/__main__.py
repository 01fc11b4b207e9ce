import sys

from .cli import main

try:
    main()
except FileNotFoundError as err:  # missing weights / offline: the message says it all, no library stack
    print(f"FileNotFoundError: {err}", file=sys.stderr)
    sys.exit(1)
