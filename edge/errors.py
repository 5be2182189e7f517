"""The one exception type the user sees: a one-line, actionable message."""


class ClaraError(Exception):
    """An error caused by input or environment, reported as one line with a non-zero exit."""
