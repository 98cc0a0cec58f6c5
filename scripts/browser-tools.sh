#!/usr/bin/env bash
# Headless Chromium for the console's browser test (tests/e2e): Debian's `chromium` and
# `chromium-driver`, driven by Selenium with an explicit driver path (Selenium Manager never
# downloads a browser or a driver).
#
#   bash scripts/browser-tools.sh    # idempotent: instant when both are already installed
#
# Best effort, never fails the build: without apt-get or root (or password-less sudo) it says
# what to install and exits 0; the browser test then skips, naming what is missing.
# Env: OCTOGRAPH_CHROMIUM / OCTOGRAPH_CHROMEDRIVER point the test at other binaries.
set -uo pipefail

log() { printf '[browser-tools] %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

CHROMIUM="${OCTOGRAPH_CHROMIUM:-chromium}"
DRIVER="${OCTOGRAPH_CHROMEDRIVER:-chromedriver}"
if have "$CHROMIUM" && have "$DRIVER"; then
  log "up to date: $(command -v "$CHROMIUM"), $(command -v "$DRIVER")"
  exit 0
fi

if ! have apt-get; then
  log "no apt-get here: install chromium and its chromedriver yourself (the e2e test skips)"
  exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif have sudo && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  log "not root and no password-less sudo: run"
  log "  sudo apt-get install --no-install-recommends chromium chromium-driver"
  exit 0
fi

log "installing chromium chromium-driver (apt-get, about 100 MB)"
export DEBIAN_FRONTEND=noninteractive
# The lists may be missing (slim images) or stale; update once, only when we install.
if "${SUDO[@]}" apt-get update -qq \
  && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver \
    >/dev/null; then
  log "installed: $(command -v chromium) $(command -v chromedriver)"
else
  log "apt-get failed: the console's browser test will skip"
fi
exit 0
