# Shared by ops/demo.sh and ops/test.sh (sourced, not run): install what is missing on
# Debian or Ubuntu, as root or with sudo, and check the Python found.

as_root() {  # as_root COMMAND...: run it as root, directly or through sudo
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

want_python_and_redis() {  # add to the array `needed` what Python with venv and Redis lack
  command -v python3 >/dev/null || needed+=(python3)
  python3 -c 'import ensurepip' 2>/dev/null || needed+=(python3-venv)
  command -v redis-server >/dev/null || needed+=(redis-server)
}

check_python() {  # stop unless python3 is 3.11 or newer
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python 3.11 or newer is needed, $(python3 --version) found" >&2
    exit 2
  fi
}
