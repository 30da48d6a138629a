"""The one exception type users see: a one-line, actionable message."""


class PMAError(Exception):
    """Bad input or a failed merge. ``str(err)`` is one line naming the file or key at fault."""


class UnknownIteration(PMAError):
    """A checkpoint that does not say which iteration it was saved at (``--order given`` takes
    such inputs in the order typed)."""
