"""Errors that reach the user as one clear line (no traceback) and a non-zero exit."""


class GmpipeError(Exception):
    """A problem the user can fix: bad input, a missing upstream artifact, an unusable file."""

    exit_code = 1
