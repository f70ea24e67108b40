#!/usr/bin/env bash
# Sets up everything tf_ssl needs on a fresh Debian machine with Python 3.11:
# a virtualenv in .venv, tf_ssl installed in it with the cpu and dev extras,
# and Debian's Fashion-MNIST package. Safe and fast to rerun: each step is
# skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python" -m venv .venv
fi

stamp=.venv/.tf_ssl-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "[setup] pip install -e .[cpu,dev] (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  touch "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ]; then
  echo "[setup] apt-get install dataset-fashion-mnist"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
