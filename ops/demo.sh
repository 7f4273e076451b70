#!/usr/bin/env bash
# The demo command: installs what the demo needs when it is missing (Debian or Ubuntu, as
# root or with sudo: python3 with venv, redis-server), makes .venv if there is none,
# installs the package into it and runs `backfill demo` with the arguments given.
#
#   ops/demo.sh           # the demo, then a summary; everything it started is stopped
#   ops/demo.sh --keep    # leaves Redis, the stub, a worker and the console running
set -euo pipefail
cd "$(dirname "$0")/.."

. ops/install.sh

needed=()
want_python_and_redis
if [ ${#needed[@]} -gt 0 ]; then
  apt_install "${needed[@]}"
fi

check_python
if [ ! -e .venv ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q -e .
exec .venv/bin/backfill demo "$@"
