"""The one base class for errors a person can fix, and how every command's `main` reports them.

Config, data, inference and evaluation errors (ConfigError, DataError, InferError, EvalError, ...)
derive from UserError: their message names the file, the entry or the option and the fix, so a
command prints that one line and exits with code 2. Every other exception is a bug in this code
(or in a library) and keeps its traceback: a shape mismatch deep in the model must never read as
the user's fault.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Input a person can fix (a config, a data file, a request); the message says what and how.

    A ValueError too, so code that caught the older ValueError-based classes still catches these.
    """

    exit_code = 2


def message_of(error: UserError) -> str:
    """Return the error's one line. A DataLoader worker's error reaches the main process re-raised by PyTorch
    as "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ..." + the worker's traceback,
    whose last line is "<class>: <message>": the message is taken back from there."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        return text.rstrip().splitlines()[-1].partition(": ")[2]
    return text


def report_user_errors(command: Callable[[], int | None]) -> int:
    """Return command()'s exit code (None counts as 0); a UserError becomes one stderr line and its exit code."""
    try:
        return command() or 0
    except UserError as error:
        print(f"error: {message_of(error)}", file=sys.stderr, flush=True)
        return error.exit_code
