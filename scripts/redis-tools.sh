#!/usr/bin/env bash
# A real redis-server for the shared-limits tests (tests/unit/test_shared_limits.py,
# tests/redis_server.py): Debian's `redis-server`, started by the tests themselves on a free
# loopback port with no persistence; nothing runs as a service.
#
#   bash scripts/redis-tools.sh    # idempotent: instant when redis-server is already installed
#
# Locally best effort: without apt-get or root (or password-less sudo) it says what to install
# and exits 0; the tests that need Redis then skip, saying so (pytest -rs prints it).
# In CI (CI=true) a redis-server it cannot provide is an error (exit 1): shared limits must not
# go untested while the run stays green (a skip under CI=true also fails: tests/ci_skips.py).
set -uo pipefail

log() { printf '[redis-tools] %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
in_ci() { case "${CI:-}" in 1 | [Tt]rue | TRUE | [Yy]es) return 0 ;; *) return 1 ;; esac; }
# Give up without a server: fatal in CI, a skip (with this message) elsewhere.
give_up() {
  if in_ci; then
    log "CI=true: $*; the shared-limits tests cannot run, failing"
    exit 1
  fi
  log "$*; the tests that need Redis will skip"
  exit 0
}

if have redis-server; then
  log "up to date: $(command -v redis-server) ($(redis-server --version | cut -d' ' -f3))"
  exit 0
fi

if ! have apt-get; then
  give_up "no apt-get here: install redis-server yourself"
fi
if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif have sudo && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  log "run: sudo apt-get install --no-install-recommends redis-server"
  give_up "not root and no password-less sudo"
fi

log "installing redis-server (apt-get, about 10 MB)"
export DEBIAN_FRONTEND=noninteractive
# The lists may be missing (slim images) or stale; update once, only when we install. The
# package's own service is not wanted (the tests start their servers): policy-rc.d may refuse
# to start it in a container, which apt reports but which does not fail the install.
if "${SUDO[@]}" apt-get update -qq \
  && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends redis-server >/dev/null; then
  log "installed: $(command -v redis-server)"
else
  give_up "apt-get install redis-server failed"
fi
if ! have redis-server; then
  give_up "installed, yet redis-server is still not on PATH"
fi
exit 0
