"""How ``ate-fast`` reports a user's mistake: one line on stderr and exit code 2.

A command handler raises :class:`CommandLineError` (or lets a ``ValueError`` /
``OSError`` from the library through); :func:`run_handler` prints
``<prog>: error: <message>`` and returns 2, or re-raises with ``--debug``. Messages name
the command-line flags: :func:`flag_names` rewrites the library's Python argument names
(``resume=True``, ``horizon=50``, ``batch_size:``) into the flags (``--resume``,
``--horizon 50``, ``--batch-size:``).

Only the standard library is imported here (``ate-fast --help`` stays cheap).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, TextIO

from ate_fast.errors import AteFastError, CommandLineError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# What counts as the user's mistake (a bad file, flag or value, a missing optional
# dependency): anything else is a bug and keeps its traceback. AteFastError covers every
# named error (CommandLineError, CheckpointError, DataFormatError, the ops' and samplers'
# errors); ValueError the rest of bad values; OSError a missing or existing file;
# ImportError a missing extra (onnx, tensorrt, metaworld).
USER_ERRORS: tuple[type[BaseException], ...] = (AteFastError, ValueError, OSError, ImportError)


def flag_names(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the Python argument names in ``flags`` (name → ``--flag``) spelt
    as flags: ``name=True`` → ``--flag``, ``name=False`` → ``no --flag``,
    ``name=value`` → ``--flag value``, ``name:`` → ``--flag:``, ``name must`` → ``--flag
    must`` (the argument checks' wording); a name with an underscore
    (``batch_size``: no English word) → ``--flag`` wherever it stands."""
    for name, flag in flags.items():
        word = re.escape(name)
        message = re.sub(rf"(?<![\w\-/.]){word}=True\b", flag, message)
        message = re.sub(rf"(?<![\w\-/.]){word}=False\b", f"no {flag}", message)
        message = re.sub(rf"(?<![\w\-/.]){word}=(?=\S)", f"{flag} ", message)
        message = re.sub(rf"(?<![\w\-/.]){word}:", f"{flag}:", message)
        message = re.sub(rf"(?<![\w\-/.]){word} must\b", f"{flag} must", message)
        if "_" in name:
            message = re.sub(rf"(?<![\w\-/.]){word}(?!\w)", flag, message)
    return message


def flag_of(dest: str) -> str:
    """The command-line flag of an argparse ``dest``: ``max_batch`` → ``--max-batch``."""
    return "--" + dest.replace("_", "-")


def with_flag_names(
    flags: Mapping[str, str],
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """A decorator for a command handler: a user error raised inside it has the Python
    argument names in ``flags`` rewritten as flags (:func:`flag_names`), type kept."""

    def decorate(handler: Callable[[argparse.Namespace], int]) -> Callable:
        @functools.wraps(handler)
        def wrapped(args: argparse.Namespace) -> int:
            try:
                return handler(args)
            except (ValueError, OSError) as exc:
                if len(exc.args) == 1 and isinstance(exc.args[0], str):
                    exc.args = (flag_names(exc.args[0], flags),)
                raise

        return wrapped

    return decorate


def device_flag(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (checked
    without importing torch; whether that GPU exists is the handler's check)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def check_output_file(out: str, overwrite: bool, flag: str = "--out") -> None:
    """``out`` must name a file to write: not a directory, nor an existing file unless
    ``overwrite`` (checked before the command's work, not after it)."""
    path = Path(out)
    if path.is_dir():
        raise CommandLineError(f"{flag} {out}: is a directory; expected the file to write")
    if path.exists() and not overwrite:
        raise CommandLineError(f"{flag} {out}: exists (pass --overwrite to replace it)")


def one_line(message: str) -> str:
    """The message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(message.split())


def run_handler(
    func: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    prog: str,
    debug: bool = False,
    stream: TextIO | None = None,
) -> int:
    """``func(args)``; a user error becomes one line on ``stream`` (stderr) and
    :data:`EXIT_USER_ERROR`, Ctrl-C the line ``interrupted`` and :data:`EXIT_INTERRUPTED`,
    unless ``debug`` (then either propagates with its traceback)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=stream or sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if debug:
            raise
        text = one_line(str(exc)) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        hint = "" if isinstance(exc, CommandLineError) else f" ({type(exc).__name__})"
        print(f"{prog}: error: {text}{hint}", file=stream or sys.stderr)
        return EXIT_USER_ERROR
