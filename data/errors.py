"""The one exception the data layer raises for bad input: its message names the file, the entry and the fix."""

import warnings
from typing import Literal, get_args

from mmdlm.errors import UserError

# data.on_error: a bad JSON entry stops the run, or is skipped, warned about and counted
OnError = Literal["stop", "skip"]
ON_ERROR = get_args(OnError)


class DataError(UserError):
    """A data file, entry, image or shard that cannot be used as it is."""


class DataWarning(UserWarning):
    """A bad sample was skipped and counted; training goes on."""


def _format(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """A DataWarning prints as the one line its message is ("warning: skipped qa.json entry id=7: ..."), not
    Python's "file:line: DataWarning: ..." followed by a line of this project's source."""
    if issubclass(category, DataWarning):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


warnings.formatwarning = _format  # installed on import, so DataLoader workers (forked or spawned) have it too
