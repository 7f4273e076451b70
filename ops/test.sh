#!/usr/bin/env bash
# The test command: installs what the tests drive when it is missing (Debian or Ubuntu, as
# root or with sudo), makes the venv, installs the package with its dev extras, runs pytest.
#
#   ops/test.sh                  # the whole suite (about 9 min on a quiet 2-core machine)
#   ops/test.sh -m "not slow"    # the quick subset (about a minute)
#   ops/test.sh tests/test_x.py  # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

. ops/install.sh

# Needed by every run: Python 3.11+ with venv, Redis, promtool (the alert rules' tests),
# faketime (the clock tests).
needed=()
want_python_and_redis
command -v promtool >/dev/null || needed+=(prometheus)
command -v faketime >/dev/null || needed+=(faketime)
if [ ${#needed[@]} -gt 0 ]; then
  apt_install "${needed[@]}"
fi
# The console's browser test; without them it is skipped, saying why (Ubuntu ships
# Chromium as a snap, which a container may not run).
browser=()
command -v chromium >/dev/null || browser+=(chromium)
command -v chromedriver >/dev/null || browser+=(chromium-driver)
if [ ${#browser[@]} -gt 0 ]; then
  apt_install "${browser[@]}" || echo "warning: no ${browser[*]}: the browser test will be skipped" >&2
fi

check_python
python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
