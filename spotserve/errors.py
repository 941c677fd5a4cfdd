"""User-facing error type: anything a user can fix by changing their input.

Commands catch `SpotserveError`, print its message as one line and exit with status 2.
Everything else is a bug and keeps its traceback.
"""


class SpotserveError(ValueError):
    """Bad input: a missing file, a malformed config, an impossible request."""
