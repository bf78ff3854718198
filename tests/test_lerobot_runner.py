"""``tests_lerobot/run.sh``: the test command starts ``run.sh --prepare`` in the background
(the LeRobot environment's install) and ends with ``run.sh`` (install if needed, then the
tests). The two must not run pip on one environment at once; the run waits for a
background install through a lock, and installs again where that install failed.

Checked on a copy of the script with stand-ins for ``python3``, the environment's ``pip``
and ``python`` that log what they run (no real install)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("flock") is None or shutil.which("bash") is None,
    reason="the runner's lock is flock(1), on Linux; elsewhere nothing runs in the background",
)

# python3 -m venv DIR: the environment's pip (logs start and end, sleeps, fails while
# FAIL_PIP names an existing file, which it then removes) and python (logs its arguments)
FAKE_PYTHON3 = """#!/usr/bin/env bash
set -e
[ "$1" = -m ] && [ "$2" = venv ] || exit 3
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<'PIP'
#!/usr/bin/env bash
echo "pip start $PIP_TAG" >> "$RUN_LOG"
sleep "$PIP_SECONDS"
if [ -n "${FAIL_PIP:-}" ] && [ -e "$FAIL_PIP" ]; then
  rm "$FAIL_PIP"; echo "pip failed $PIP_TAG" >> "$RUN_LOG"; exit 1
fi
echo "pip end $PIP_TAG" >> "$RUN_LOG"
PIP
cat > "$3/bin/python" <<'PY'
#!/usr/bin/env bash
echo "python $*" >> "$RUN_LOG"
PY
chmod +x "$3/bin/pip" "$3/bin/python"
"""


def _tree(tmp_path: Path) -> tuple[Path, dict]:
    """A repository root holding only the runner, an existing (empty) environment folder
    (so its free-space check is not what is tested), and stand-in tools on PATH."""
    root = tmp_path / "repo"
    (root / "tests_lerobot").mkdir(parents=True)
    shutil.copy(REPO / "tests_lerobot" / "run.sh", root / "tests_lerobot" / "run.sh")
    (root / ".venv-lerobot").mkdir()
    tools = tmp_path / "tools"
    tools.mkdir()
    python3 = tools / "python3"
    python3.write_text(FAKE_PYTHON3)
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "run.log"
    env = dict(os.environ, PATH=f"{tools}{os.pathsep}{os.environ['PATH']}", RUN_LOG=str(log))
    return root, env


def _wait_for(log: Path, line: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and line in log.read_text().splitlines():
            return
        time.sleep(0.02)
    raise AssertionError(f"{line!r} never appeared in {log}")


def _run(root: Path, env: dict, tag: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(env, PIP_TAG=tag, **kw)
    return subprocess.Popen(
        ["bash", str(root / "tests_lerobot" / "run.sh"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _runs(
    tmp_path: Path, background_s: Optional[str], fail_first: bool, *args: str
) -> tuple[Optional[int], int, str, list[str]]:
    """``run.sh --prepare`` in the background (its pip taking ``background_s``; None: no
    background install), then, once that holds the lock, ``run.sh ARGS``; ``fail_first``:
    the first pip to run fails. Returns the background's and the run's exit codes, the
    run's output and the log."""
    root, env = _tree(tmp_path)
    log = Path(env["RUN_LOG"])
    if fail_first:
        fail_once = tmp_path / "fail-once"
        fail_once.touch()
        env["FAIL_PIP"] = str(fail_once)
    background = None
    if background_s is not None:
        background = _run(root, env, "background", "--prepare", PIP_SECONDS=background_s)
        _wait_for(log, "pip start background")  # it holds the lock now
    run = _run(root, env, "run", *args, PIP_SECONDS="0")
    out, _ = run.communicate(timeout=60)
    status = None if background is None else background.wait(timeout=60)
    return status, run.returncode, out, log.read_text().splitlines()


def test_the_run_waits_for_a_background_install(tmp_path):
    background, run, out, log = _runs(tmp_path, "1.5", False, "-k", "x")
    assert (background, run) == (0, 0), out
    assert log == [
        "pip start background",
        "pip end background",
        "pip start run",  # only after the background's install ended
        "pip end run",
        "python -m pytest -q -p no:cacheprovider -k x",
    ]


def test_a_failed_background_install_is_run_again_in_the_foreground(tmp_path):
    background, run, out, log = _runs(tmp_path, "0.5", True)
    assert background != 0  # --prepare reports its failure
    assert run == 0, out
    assert log == [
        "pip start background",
        "pip failed background",
        "pip start run",
        "pip end run",
        "python -m pytest -q -p no:cacheprovider",
    ]


def test_a_failed_foreground_install_fails_the_run_before_the_tests(tmp_path):
    _, run, out, log = _runs(tmp_path, None, True)  # no background install
    assert run != 0, out
    assert log == ["pip start run", "pip failed run"]
