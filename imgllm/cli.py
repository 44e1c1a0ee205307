"""What train.py and infer.py do with an error: the user's mistakes as one line and exit status 2.

The project's own errors (bad data, bad config, bad checkpoint, a missing optional package) are ValueError,
OSError or ImportError subclasses whose messages name the file, key or value at fault and what to do; a traceback
adds nothing for the user, so `user_errors_exit` prints "PROGRAM: error: MESSAGE" and returns 2. `--debug` on the
command line or IMGLLM_DEBUG=1 re-raises instead, for the traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

USER_ERRORS = (ValueError, OSError, ImportError, KeyError)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "IMGLLM_DEBUG"
USAGE_STATUS = 2


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether the user asked for tracebacks: --debug among the arguments, or IMGLLM_DEBUG set (not 0/empty)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def without_debug_flag(argv: Sequence[str]) -> list[str]:
    """`argv` less the --debug flag (the parsers do not know it)."""
    return [arg for arg in argv if arg != DEBUG_FLAG]


def error_message(error: BaseException) -> str:
    """The error's message for the terminal: KeyError's repr quotes dropped, and the hint of a missing module."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, ModuleNotFoundError) and error.name and "pip install" not in str(message):
        message = f"{message} (pip install -e . installs what imgllm needs; see the README for the extras)"
    return str(message).strip() or type(error).__name__


def user_errors_exit(program: str, function: Callable[..., Any], *args: Any, debug: bool = False) -> Any:
    """`function(*args)`; a user error (USER_ERRORS) becomes one line on stderr and exit status 2, unless `debug`."""
    try:
        return function(*args)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{program}: error: {error_message(error)}", file=sys.stderr)
        sys.exit(USAGE_STATUS)
