"""The one exception type users see: a one-line, actionable message."""


class PMAError(Exception):
    """Bad input or a failed merge. ``str(err)`` is one line naming the file or key at fault."""
