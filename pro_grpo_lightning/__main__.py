from .cli import console_main

# A settings or file error prints one line (``error: ...``) and exits 2; a run stopped by the
# non-finite guard exits 1; PRO_GRPO_DEBUG=1 shows the full traceback instead.
console_main()
