"""``python -m worker`` is the ``backfill`` command."""

from worker.cli import main

main()
