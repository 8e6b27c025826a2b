"""The one exception the data layer raises for bad input: its message names the file, the entry and the fix."""


class DataError(ValueError):
    """A data file, entry, image or shard that cannot be used as it is."""


class DataWarning(UserWarning):
    """A bad sample was skipped and counted; training goes on."""
