"""The one exception the data layer raises for bad input: its message names the file, the entry and the fix."""

from typing import Literal, get_args

from mmdlm.errors import UserError

# data.on_error: a bad JSON entry stops the run, or is skipped, warned about and counted
OnError = Literal["stop", "skip"]
ON_ERROR = get_args(OnError)


class DataError(UserError):
    """A data file, entry, image or shard that cannot be used as it is."""


class DataWarning(UserWarning):
    """A bad sample was skipped and counted; training goes on."""
