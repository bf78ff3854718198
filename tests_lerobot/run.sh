#!/usr/bin/env bash
# The LeRobot integration tests, in their own environment: LeRobot 0.4.4 pins torch < 2.11
# (a CUDA build from PyPI, which runs on the CPU), while the main environment keeps the
# torch 2.13.0 CPU build. The tests import the in-tree ate_fast, whose native modules the
# main install (`pip install -e .`) built in place; they do not link torch, so the same
# files serve both environments. Offline: the policies are tiny, built from configs.
#
#   bash tests_lerobot/run.sh [PYTEST_ARGS…]   make the environment if needed, run the tests
#   bash tests_lerobot/run.sh --prepare        make the environment only
#
# The README's test command starts `--prepare` in the background at its beginning (output
# in .venv-lerobot.log): the install, ≈ 3 minutes of one core mostly unpacking wheels,
# then overlaps the main install and tests instead of following the gate. Both hold
# .venv-lerobot.lock while they install, so the run waits for a background install still
# going, then finds everything in place (pip: ≈ 5 s) — or, if it failed, installs again in
# the foreground, where pip's error shows.
set -euo pipefail
cd "$(dirname "$0")/.."

install_env() {
  if [ ! -d .venv-lerobot ]; then
    # The environment takes ~8.5 GB (torch 2.10's CUDA build and its nvidia-* wheels), and
    # pip unpacks the wheels beside it: say so up front rather than fail mid-install.
    local need_gb=9 free_gb
    free_gb=$(df -P -B1G . | awk 'NR == 2 {print $4}')
    if [ "$free_gb" -lt "$need_gb" ]; then
      echo "tests_lerobot/run.sh: LeRobot's environment needs about ${need_gb} GB free on" \
        "$(pwd), ${free_gb} GB are: free some space and run it again" >&2
      return 1
    fi
  fi
  python3 -m venv .venv-lerobot
  .venv-lerobot/bin/pip install --quiet "lerobot[smolvla,peft]==0.4.4" "pytest>=7.4" "h5py>=3.8"
}

locked_install() {
  if command -v flock > /dev/null; then
    (flock 9 && install_env) 9> .venv-lerobot.lock
  else  # no flock (not Linux): nothing runs in the background to wait for
    install_env
  fi
}

if [ "${1:-}" = "--prepare" ]; then
  locked_install
  exit
fi
locked_install
cd tests_lerobot
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/..:$PWD" \
  ../.venv-lerobot/bin/python -m pytest -q -p no:cacheprovider "$@"
