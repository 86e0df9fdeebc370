"""Named exceptions for the errors users meet; the CLI prints them as one line and exits non-zero."""


class RapidinError(Exception):
    """Base class: a problem with the user's input, config or stores, reported as one line."""


class DataError(RapidinError):
    """A malformed dataset record; the message names file:line."""


class StoreMismatchError(RapidinError):
    """A store written with settings that differ from the current ones; the message names the field."""
