"""The ``backfill`` command line (SPEC section 6): thin wrappers that parse, call, print.

One module per group of commands: ``records`` (enqueue, status), ``find``, ``dead``,
``services`` (worker, intake, stub, demo), ``health`` and ``console``; ``common`` holds the
exit codes (0 success, 1 runtime failure, 2 bad input or bad configuration).
"""

from __future__ import annotations

import click

from worker.cli.console import console
from worker.cli.dead import dead
from worker.cli.find import find
from worker.cli.health import health
from worker.cli.records import enqueue, status
from worker.cli.services import demo, intake, stub, worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver postback backfill records to the SMS provider."""


for command in (worker, enqueue, status, find, stub, demo, intake, health, dead, console):
    main.add_command(command)
