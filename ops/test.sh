#!/usr/bin/env bash
# The test command: installs what the tests drive when it is missing (Debian or Ubuntu, as
# root or with sudo), makes the venv, installs the package with its dev extras, runs pytest.
#
#   ops/test.sh                  # the whole suite (about 9 min on a quiet 2-core machine)
#   ops/test.sh -m "not slow"    # the quick subset (under a minute and a half)
#   ops/test.sh tests/test_x.py  # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "error: installing $* needs root or sudo; install them and run again" >&2
    exit 2
  fi
}

apt_install() {  # apt_install PACKAGE...: update the lists once, then install
  if ! command -v apt-get >/dev/null; then
    echo "error: no apt-get here: install $* yourself and run again" >&2
    exit 2
  fi
  if [ -z "${lists_updated:-}" ]; then
    as_root apt-get update -q
    lists_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Needed by every run: Python 3.11+ with venv, Redis, promtool (the alert rules' tests),
# faketime (the clock tests).
needed=()
command -v python3 >/dev/null || needed+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || needed+=(python3-venv)
command -v redis-server >/dev/null || needed+=(redis-server)
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

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python 3.11 or newer is needed, $(python3 --version) found" >&2
  exit 2
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
