#!/usr/bin/env bash
# The LeRobot integration tests, in their own environment: LeRobot 0.4.4 pins torch < 2.11
# (a CUDA build from PyPI, which runs on the CPU), while the main environment keeps the
# torch 2.13.0 CPU build. The tests import the in-tree ate_fast, whose native modules the
# main install (`pip install -e .`) built in place; they do not link torch, so the same
# files serve both environments. Offline: the policies are tiny, built from configs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv-lerobot ]; then
  # The environment takes ~8.5 GB (torch 2.10's CUDA build and its nvidia-* wheels), and
  # pip unpacks the wheels beside it: say so up front rather than fail mid-install.
  need_gb=9
  free_gb=$(df -P -B1G . | awk 'NR == 2 {print $4}')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "tests_lerobot/run.sh: LeRobot's environment needs about ${need_gb} GB free on" \
      "$(pwd), ${free_gb} GB are: free some space and run it again" >&2
    exit 1
  fi
fi
python3 -m venv .venv-lerobot
.venv-lerobot/bin/pip install --quiet "lerobot[smolvla,peft]==0.4.4" "pytest>=7.4" "h5py>=3.8"
cd tests_lerobot
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/..:$PWD" \
  ../.venv-lerobot/bin/python -m pytest -q -p no:cacheprovider "$@"
