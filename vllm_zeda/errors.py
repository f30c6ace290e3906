"""One exception type for bad input, and the CLI wrapper that turns it into one clear line."""
from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable


class ZedaError(Exception):
    """Bad input or an unusable checkpoint; the message is meant for the user as is."""

    exit_code = 2


class Interrupted(ZedaError):
    """Ctrl-C, with what to do next."""

    exit_code = 130


def _sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a CLI main: a ZedaError (or Ctrl-C, or SIGTERM, which `timeout`, `kill` and job
    schedulers send, taken as Ctrl-C) becomes one line on stderr and exit code != 0."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        try:
            return int(main(*args, **kwargs) or 0)
        except ZedaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
