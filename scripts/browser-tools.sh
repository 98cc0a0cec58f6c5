#!/usr/bin/env bash
# Headless Chromium for the console's browser test (tests/e2e): Debian's `chromium` and
# `chromium-driver`, driven by Selenium with an explicit driver path (Selenium Manager never
# downloads a browser or a driver).
#
#   bash scripts/browser-tools.sh    # idempotent: instant when both are already installed
#
# Locally best effort: without apt-get or root (or password-less sudo) it says what to install
# and exits 0; the browser tests then skip, naming what is missing (pytest -rs prints it).
# In CI (CI=true) a browser it cannot provide is an error (exit 1): the console must not go
# untested while the run stays green (a skip under CI=true also fails: tests/ci_skips.py).
# Env: OCTOGRAPH_CHROMIUM / OCTOGRAPH_CHROMEDRIVER point the test at other binaries.
set -uo pipefail

log() { printf '[browser-tools] %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
in_ci() { case "${CI:-}" in 1 | [Tt]rue | TRUE | [Yy]es) return 0 ;; *) return 1 ;; esac; }
# Give up without a browser: fatal in CI, a skip (with this message) elsewhere.
give_up() {
  if in_ci; then
    log "CI=true: $*; the console's browser tests cannot run, failing"
    exit 1
  fi
  log "$*; the console's browser tests will skip"
  exit 0
}

CHROMIUM="${OCTOGRAPH_CHROMIUM:-chromium}"
DRIVER="${OCTOGRAPH_CHROMEDRIVER:-chromedriver}"
if have "$CHROMIUM" && have "$DRIVER"; then
  log "up to date: $(command -v "$CHROMIUM"), $(command -v "$DRIVER")"
  exit 0
fi

if ! have apt-get; then
  give_up "no apt-get here: install chromium and its chromedriver yourself"
fi
if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif have sudo && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  log "run: sudo apt-get install --no-install-recommends chromium chromium-driver"
  give_up "not root and no password-less sudo"
fi

log "installing chromium chromium-driver (apt-get, about 100 MB)"
export DEBIAN_FRONTEND=noninteractive
# The lists may be missing (slim images) or stale; update once, only when we install.
if "${SUDO[@]}" apt-get update -qq \
  && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver \
    >/dev/null; then
  log "installed: $(command -v chromium) $(command -v chromedriver)"
else
  give_up "apt-get install chromium chromium-driver failed"
fi
if ! { have "$CHROMIUM" && have "$DRIVER"; }; then
  give_up "installed, yet $CHROMIUM or $DRIVER is still not on PATH"
fi
exit 0
