#!/usr/bin/env bash
# The LeRobot integration tests, in their own environment: LeRobot 0.4.4 pins torch < 2.11
# (a CUDA build from PyPI, which runs on the CPU), while the main environment keeps the
# torch 2.13.0 CPU build. The tests import the in-tree ate_fast, whose native modules the
# main install (`pip install -e .`) built in place; they do not link torch, so the same
# files serve both environments. Offline: the policies are tiny, built from configs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-lerobot
.venv-lerobot/bin/pip install --quiet "lerobot[smolvla,peft]==0.4.4" "pytest>=7.4" "h5py>=3.8"
cd tests_lerobot
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/..:$PWD" \
  ../.venv-lerobot/bin/python -m pytest -q -p no:cacheprovider "$@"
